"""Schedules: when scripts fire, and which firing starts which run.

**Schedules** are stored in Redis (``echoq:schedule:<id>``) and each has one RedBeat entry that
publishes ``echoq.schedule.fire(<id>)``; ``echoq beat`` runs RedBeat, which rereads its entries
from Redis on every tick, so adding, editing, pausing and removing take effect while everything
runs. Three kinds, all timezone-aware (``tz``, an IANA name, default UTC):

- ``cron``: five-field cron, evaluated in ``tz`` with croniter (so 09:00 stays 09:00 across DST).
  RedBeat's own crontab has one timezone per app, so the entry is a UTC crontab on the cron's
  minute field (every minute when ``tz`` has non-whole-hour offsets) and the fire task acts only
  on slots that match the cron in ``tz``.
- ``every``: a whole number of seconds; slots lie on a grid anchored when the timing was set.
- ``at``: one date-time (a naive one is read in ``tz``), a RedBeat rrule with count 1.

**Exactly once per firing.** A firing derives its slot (the latest slot at or before now, with
:data:`TOLERANCE_S` for clock skew) and its run id ``sch:<schedule>:<slot, UTC compact>``; the run
record is created with ``SET NX``, so a second firing of the slot (two schedulers, a retried
publish) is a no-op, and line *n* is enqueued with utterance id ``sch:<schedule>:<slot>:<n>``,
which the conversation log adds once however often it is enqueued.

**Missed firings.** RedBeat publishes an overdue entry once when it runs again. The firing then
stands for the latest missed slot only (earlier missed slots are dropped, never replayed): it
runs late when it is at most the grace window late — ``ECHOQ_SCHEDULE_GRACE_S`` seconds, default
60, or the schedule's own ``grace`` — and is recorded as ``skipped`` otherwise. Slots before the
schedule was created, last edited or resumed never run.

Timings and slot maths are :mod:`producer.scripting.timing`; runs and their pacing (``echoq:run:<id>``,
``echoq:runs:due``, the pump) are :mod:`producer.scripting.runs`.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import math
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery

from worker import keys, redisio
from worker.errors import InvalidInput, UnknownConversation
from worker.settings import Settings, get_settings

from .runs import RUNS_DUE, Runner, _text, run_key
from .script import Script, parse_duration, parse_script
from .timing import Timing, is_slot, latest_slot, next_slot, parse_slot_id, parse_timing, slot_id, trigger

#: environment variable: how late (seconds) a missed firing may still run
GRACE_ENV = "ECHOQ_SCHEDULE_GRACE_S"
DEFAULT_GRACE_S = 60.0
#: a firing this early or late is still "on time" (clock skew between beat and workers)
TOLERANCE_S = 1.0
#: run records kept per schedule
HISTORY_MAX = 200

SCHEDULE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SCHEDULES = "echoq:schedules"


def schedule_key(schedule_id: str) -> str:
    """String: the schedule record (JSON)."""
    return f"echoq:schedule:{schedule_id}"


def history_key(schedule_id: str) -> str:
    """Sorted set: run ids of one schedule, scored by slot time."""
    return f"echoq:schedule:{schedule_id}:runs"


def grace_s() -> float:
    """The default grace window for missed firings, from ``ECHOQ_SCHEDULE_GRACE_S`` (default 60)."""
    import os

    raw = os.environ.get(GRACE_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_GRACE_S
    except ValueError:
        return DEFAULT_GRACE_S
    return max(0.0, value)


# schedules -----------------------------------------------------------------------------------


class Schedules:
    """The schedule store: add, list, get, update, pause, resume, remove, history; and firings."""

    def __init__(self, redis_client: redis.Redis | None = None, *, settings: Settings | None = None,
                 runner: Runner | None = None) -> None:
        self.settings = settings or get_settings()
        self.r = redis_client or redisio.connect(self.settings.redis_url)
        self.runner = runner or Runner(self.r, settings=self.settings)
        from producer.scripting.beat import configure_redbeat

        # A private app for RedBeat entries, so its cached config never leaks between stores.
        self.beat_app = Celery("echoq-schedules", set_as_current=False)
        self.beat_app.conf.update(timezone="UTC", enable_utc=True, broker_url=self.settings.broker)
        configure_redbeat(self.beat_app, self.settings.redis_url)

    _default: Schedules | None = None

    @classmethod
    def default(cls) -> Schedules:
        """A process-wide store on the configured Redis."""
        if cls._default is None:
            cls._default = cls()
        return cls._default

    def _checked(self, timing: Timing, at: Any) -> Timing:
        """Refuse a timing that parses but can never be computed (``0 0 30 2 *``, a date-time at
        the end of the calendar) before it is stored, where it would break every later listing."""
        now = datetime.now(UTC)
        if timing.at is not None and timing.at.timestamp() <= now.timestamp():
            raise InvalidInput(f"at: {timing.at.isoformat()} is in the past")
        try:
            next_slot(timing, now.timestamp(), now)
            latest_slot(timing, now.timestamp(), now)
            timing.to_dict()
            trigger(timing, self.beat_app)
        except (ValueError, OverflowError) as exc:
            value = timing.cron if timing.cron else timing.every_s or at
            raise InvalidInput(f"{timing.kind}: {value!r} never fires ({type(exc).__name__})") from exc
        return timing

    # public API ----------------------------------------------------------------------------

    def add(self, script: Script | dict[str, Any], *, cron: str | None = None, every: Any = None, at: Any = None,
            tz: str | None = None, schedule_id: str | None = None, name: str | None = None,
            grace: Any = None) -> dict[str, Any]:
        """Store a schedule and arm its RedBeat entry; returns the schedule record."""
        sid = schedule_id or uuid.uuid4().hex[:12]
        _check_schedule_id(sid)
        timing = self._checked(parse_timing(cron=cron, every=every, at=at, tz=tz), at)
        scr = _as_script(script)
        now = time.time()
        rec = {"id": sid, "name": name or scr.name, "timing": timing.to_dict(), "script": scr.to_dict(),
               "grace_s": _grace(grace), "paused": False, "created_at": now, "updated_at": now,
               "not_before": now, "anchor": now}
        if not self.r.set(schedule_key(sid), json.dumps(rec), nx=True):
            raise InvalidInput(f"a schedule {sid!r} already exists")
        self.r.sadd(SCHEDULES, sid)
        self._arm(rec)
        return self.get(sid)

    def list(self) -> builtins.list[dict[str, Any]]:
        """Every schedule, by id, with its next firing."""
        out = []
        for sid in sorted(_text(m) for m in self.r.smembers(SCHEDULES)):
            rec = self._load(sid)
            if rec is not None:
                out.append(self._view(rec))
        return out

    def get(self, schedule_id: str) -> dict[str, Any]:
        """One schedule with its next firing and its last run; InvalidInput when there is none."""
        rec = self._require(schedule_id)
        view = self._view(rec)
        last = self.history(schedule_id, limit=1)
        view["last_run"] = last[0] if last else None
        return view

    def update(self, schedule_id: str, *, script: Script | dict[str, Any] | None = None, cron: str | None = None,
               every: Any = None, at: Any = None, tz: str | None = None, name: str | None = None,
               grace: Any = None) -> dict[str, Any]:
        """Change a schedule's script, timing, timezone, name or grace; applies from the next slot."""
        rec = self._require(schedule_id)
        now = time.time()
        if script is not None:
            rec["script"] = _as_script(script).to_dict()
        if any(v not in (None, "") for v in (cron, every, at)) or tz:
            old = _timing_of(rec)
            if any(v not in (None, "") for v in (cron, every, at)):
                timing = parse_timing(cron=cron, every=every, at=at, tz=tz or old.tz)
            else:
                timing = parse_timing(cron=old.cron, every=old.every_s, at=old.at, tz=tz)
            rec["timing"] = self._checked(timing, at).to_dict()
            rec["anchor"] = now
        if name is not None:
            rec["name"] = name
        if grace is not None:
            rec["grace_s"] = _grace(grace)
        rec["updated_at"] = now
        rec["not_before"] = now
        self._save(rec)
        if not rec["paused"]:
            self._arm(rec)
        return self.get(schedule_id)

    def pause(self, schedule_id: str) -> dict[str, Any]:
        """Stop firing (the RedBeat entry is removed) until :meth:`resume`."""
        rec = self._require(schedule_id)
        rec["paused"] = True
        rec["updated_at"] = time.time()
        self._save(rec)
        self._disarm(schedule_id)
        return self.get(schedule_id)

    def resume(self, schedule_id: str) -> dict[str, Any]:
        """Fire again from the next slot; slots that passed while paused never run."""
        rec = self._require(schedule_id)
        now = time.time()
        rec.update(paused=False, updated_at=now, not_before=now)
        self._save(rec)
        self._arm(rec)
        return self.get(schedule_id)

    def remove(self, schedule_id: str) -> None:
        """Delete a schedule, its RedBeat entry and its run history (utterance records stay)."""
        self._require(schedule_id)
        self._disarm(schedule_id)
        runs = [_text(m) for m in self.r.zrange(history_key(schedule_id), 0, -1)]
        pipe = self.r.pipeline()
        pipe.delete(schedule_key(schedule_id), history_key(schedule_id), *[run_key(x) for x in runs])
        pipe.srem(SCHEDULES, schedule_id)
        if runs:
            pipe.zrem(RUNS_DUE, *runs)
        pipe.execute()

    def history(self, schedule_id: str, limit: int = 20) -> builtins.list[dict[str, Any]]:
        """The schedule's runs, newest first: slot, when it fired, and each line's utterance and state."""
        ids = [_text(m) for m in self.r.zrevrange(history_key(schedule_id), 0, max(0, limit - 1))]
        out = []
        for run_id in ids:
            run = self.runner.status(run_id)
            if run is not None:
                out.append(run)
        return out

    # firings -------------------------------------------------------------------------------

    def fire(self, schedule_id: str, *, slot: str | None = None, now: float | None = None) -> dict[str, Any]:
        """Handle one firing; idempotent per slot. Returns what happened (``action``)."""
        rec = self._load(schedule_id)
        if rec is None:
            return {"schedule_id": schedule_id, "action": "ignored", "reason": "no such schedule"}
        if rec.get("paused"):
            return {"schedule_id": schedule_id, "action": "ignored", "reason": "paused"}
        timing = _timing_of(rec)
        t = time.time() if now is None else now
        if slot is not None:
            at = parse_slot_id(slot)
            if not is_slot(timing, rec["anchor"], at):
                raise InvalidInput(f"{slot!r} is not a slot of schedule {schedule_id!r}")
        else:
            tol = min(TOLERANCE_S, timing.every_s / 4) if timing.every_s else TOLERANCE_S
            found = latest_slot(timing, rec["anchor"], datetime.fromtimestamp(t + tol, UTC))
            if found is None:
                return {"schedule_id": schedule_id, "action": "ignored", "reason": "no slot yet"}
            at = found
        if at.timestamp() < math.floor(rec["not_before"]):
            return {"schedule_id": schedule_id, "action": "ignored", "reason": "slot before the schedule was set"}
        late = max(0.0, t - at.timestamp())
        grace = rec.get("grace_s")
        grace = grace_s() if grace is None else float(grace)
        run_id = f"sch:{schedule_id}:{slot_id(at)}"
        if timing.every_s and slot is None and late < timing.every_s / 2:
            self._realign(schedule_id, at)
        if late > grace + TOLERANCE_S:
            return self._outcome(schedule_id, run_id, at, t, late, "skipped",
                                 f"missed: {late:.0f}s late, grace {grace:g}s")
        script = parse_script(rec["script"], source=f"schedule {schedule_id}", check_audio=False)
        try:
            run = self.runner.start(script, run_id=run_id, schedule_id=schedule_id, slot=at.timestamp(),
                                    fired_at=t, late_s=late)
        except UnknownConversation as exc:
            return self._outcome(schedule_id, run_id, at, t, late, "failed", str(exc))
        if run.get("created"):
            self._remember(schedule_id, run_id, at.timestamp())
            return {"schedule_id": schedule_id, "run_id": run_id, "action": "started", "late_s": round(late, 3)}
        return {"schedule_id": schedule_id, "run_id": run_id, "action": "duplicate"}

    # internals -----------------------------------------------------------------------------

    def _outcome(self, schedule_id: str, run_id: str, at: datetime, t: float, late: float, state: str,
                 reason: str) -> dict[str, Any]:
        created = self.runner.record_outcome(run_id, schedule_id, at.timestamp(), t, late, state, reason)
        if created:
            self._remember(schedule_id, run_id, at.timestamp())
        return {"schedule_id": schedule_id, "run_id": run_id, "action": state if created else "duplicate",
                "reason": reason}

    def _entry_name(self, schedule_id: str) -> str:
        return f"echoq-schedule:{schedule_id}"

    def _arm(self, rec: dict[str, Any]) -> None:
        from redbeat import RedBeatSchedulerEntry

        from producer.scripting.beat import TASK_FIRE

        self._disarm(rec["id"])
        entry = RedBeatSchedulerEntry(self._entry_name(rec["id"]), TASK_FIRE, trigger(_timing_of(rec), self.beat_app),
                                      args=[rec["id"]], options={"queue": keys.CONTROL_QUEUE}, app=self.beat_app)
        # counted from now: a new or resumed entry waits for its next slot instead of firing at once
        entry.last_run_at = datetime.now(UTC)
        entry.save()

    def _disarm(self, schedule_id: str) -> None:
        from redbeat import RedBeatSchedulerEntry

        RedBeatSchedulerEntry(self._entry_name(schedule_id), app=self.beat_app).delete()

    def _realign(self, schedule_id: str, slot: datetime) -> None:
        """Count the next interval from the slot, not from when beat woke, so firings never drift."""
        from redbeat import RedBeatSchedulerEntry

        key = RedBeatSchedulerEntry.generate_key(self.beat_app, self._entry_name(schedule_id))
        with contextlib.suppress(KeyError):  # removed or paused meanwhile
            RedBeatSchedulerEntry.from_key(key, app=self.beat_app).reschedule(last_run_at=slot)

    def _remember(self, schedule_id: str, run_id: str, slot: float) -> None:
        pipe = self.r.pipeline()
        pipe.zadd(history_key(schedule_id), {run_id: slot})
        pipe.zrange(history_key(schedule_id), 0, -(HISTORY_MAX + 1))
        _, old = pipe.execute()
        if old:
            self.r.zrem(history_key(schedule_id), *old)
            self.r.delete(*[run_key(_text(x)) for x in old])

    def _view(self, rec: dict[str, Any]) -> dict[str, Any]:
        timing = _timing_of(rec)
        view = {k: v for k, v in rec.items() if k not in ("anchor", "not_before")}
        view["describe"] = timing.describe()
        nxt = None
        if not rec.get("paused"):
            after = datetime.fromtimestamp(max(time.time(), rec["not_before"]), UTC)
            slot = next_slot(timing, rec["anchor"], after)
            nxt = slot.astimezone(timing.zone).isoformat() if slot else None
        view["next_run"] = nxt
        view["state"] = "paused" if rec.get("paused") else ("active" if nxt else "finished")
        return view

    def _load(self, schedule_id: str) -> dict[str, Any] | None:
        raw = self.r.get(schedule_key(schedule_id))
        return json.loads(raw) if raw else None

    def _require(self, schedule_id: str) -> dict[str, Any]:
        rec = self._load(schedule_id) if SCHEDULE_ID_RE.match(schedule_id or "") else None
        if rec is None:
            raise InvalidInput(f"no schedule {schedule_id!r}")
        return rec

    def _save(self, rec: dict[str, Any]) -> None:
        self.r.set(schedule_key(rec["id"]), json.dumps(rec))


def _timing_of(rec: dict[str, Any]) -> Timing:
    t = rec["timing"]
    return parse_timing(cron=t.get("cron"), every=t.get("every"), at=t.get("at"), tz=t.get("tz"))


def _as_script(script: Script | dict[str, Any]) -> Script:
    return script if isinstance(script, Script) else parse_script(script, source="script", check_audio=False)


def _grace(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise InvalidInput(f"grace: {exc}") from exc


def _check_schedule_id(schedule_id: str) -> None:
    if not isinstance(schedule_id, str) or not SCHEDULE_ID_RE.match(schedule_id):
        raise InvalidInput(f"schedule id must be 1-64 letters, digits, '.', '_' or '-', not {schedule_id!r}")


# plain functions for the HTTP API ------------------------------------------------------------


def add_schedule(spec: dict[str, Any]) -> dict[str, Any]:
    """Add a schedule from a JSON body: ``script`` (a script mapping), one of ``cron``/``every``/``at``,
    optional ``tz``, ``id``, ``name``, ``grace``."""
    if not isinstance(spec, dict) or "script" not in spec:
        raise InvalidInput("script: required (a script mapping: conversation and lines)")
    unknown = set(spec) - {"script", "cron", "every", "at", "tz", "id", "name", "grace"}
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}")
    return Schedules.default().add(spec["script"], cron=spec.get("cron"), every=spec.get("every"), at=spec.get("at"),
                                   tz=spec.get("tz"), schedule_id=spec.get("id"), name=spec.get("name"),
                                   grace=spec.get("grace"))


def list_schedules() -> list[dict[str, Any]]:
    """Every schedule."""
    return Schedules.default().list()


def get_schedule(schedule_id: str) -> dict[str, Any]:
    """One schedule; InvalidInput ("no schedule …") when there is none."""
    return Schedules.default().get(schedule_id)


def update_schedule(schedule_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Edit a schedule from a JSON body with any of the fields :func:`add_schedule` takes (not ``id``)."""
    unknown = set(spec) - {"script", "cron", "every", "at", "tz", "name", "grace"}
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}")
    return Schedules.default().update(schedule_id, **spec)


def pause_schedule(schedule_id: str) -> dict[str, Any]:
    """Pause a schedule."""
    return Schedules.default().pause(schedule_id)


def resume_schedule(schedule_id: str) -> dict[str, Any]:
    """Resume a paused schedule."""
    return Schedules.default().resume(schedule_id)


def remove_schedule(schedule_id: str) -> None:
    """Remove a schedule."""
    Schedules.default().remove(schedule_id)


def schedule_history(schedule_id: str, limit: int = 20) -> list[dict[str, Any]]:
    """A schedule's runs, newest first."""
    Schedules.default()._require(schedule_id)
    return Schedules.default().history(schedule_id, limit=limit)
