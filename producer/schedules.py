"""Schedules and script runs: when scripts fire, and how their lines are paced.

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

**Runs and pacing.** A run (``echoq:run:<id>``) enqueues its lines in order. A line without an
offset is enqueued at once when the line before has no pause; otherwise once the line before is
*sent* plus its pause. A line with ``at`` is enqueued ``at`` after the run started. Nothing
sleeps: a run that must wait is put in the sorted set ``echoq:runs:due`` (score = when to look
again) and the ``echoq.script.pump`` task advances it — published by beat every second, and by
the run itself with a short countdown (≤ 5 s, chained) so pauses are punctual. Redis, not a
Celery message, holds the truth; a lost pump message delays a run by at most a second while
beat runs.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import math
import re
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import redis
from celery import Celery
from celery.schedules import crontab
from celery.schedules import schedule as interval_schedule
from croniter import croniter

from worker import keys
from worker.errors import EchoqError, InvalidInput, PermanentError, UnknownConversation
from worker.settings import Settings, get_settings
from worker.store import FINAL_STATES

from .scripts import Script, parse_duration, parse_script

#: environment variable: how late (seconds) a missed firing may still run
GRACE_ENV = "ECHOQ_SCHEDULE_GRACE_S"
DEFAULT_GRACE_S = 60.0
#: a firing this early or late is still "on time" (clock skew between beat and workers)
TOLERANCE_S = 1.0
#: how often a run looks at the line it waits on to be sent
POLL_S = 0.25
#: when a pump finds its run busy, how soon another one looks
BUSY_RETRY_S = 0.2
#: run records kept per schedule
HISTORY_MAX = 200
#: a run that holds its lock longer than this is presumed dead
RUN_LOCK_MS = 30_000

SCHEDULE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SCHEDULES = "echoq:schedules"
RUNS_DUE = "echoq:runs:due"
PENDING_LINE_STATES = ("queued", "sending")

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def schedule_key(schedule_id: str) -> str:
    """String: the schedule record (JSON)."""
    return f"echoq:schedule:{schedule_id}"


def history_key(schedule_id: str) -> str:
    """Sorted set: run ids of one schedule, scored by slot time."""
    return f"echoq:schedule:{schedule_id}:runs"


def run_key(run_id: str) -> str:
    """String: the run record (JSON)."""
    return f"echoq:run:{run_id}"


def _lock_key(run_id: str) -> str:
    return f"echoq:run:{run_id}:lock"


def _hint_key(run_id: str) -> str:
    return f"echoq:run:{run_id}:hint"


def grace_s() -> float:
    """The default grace window for missed firings, from ``ECHOQ_SCHEDULE_GRACE_S`` (default 60)."""
    import os

    raw = os.environ.get(GRACE_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_GRACE_S
    except ValueError:
        return DEFAULT_GRACE_S
    return max(0.0, value)


# timing (pure) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """When a schedule fires: exactly one of ``cron``, ``every_s``, ``at``; ``tz`` an IANA name."""

    cron: str | None = None
    every_s: int | None = None
    at: datetime | None = None
    tz: str = "UTC"

    @property
    def kind(self) -> str:
        return "cron" if self.cron else "every" if self.every_s else "at"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "tz": self.tz}
        if self.cron:
            d["cron"] = self.cron
        if self.every_s:
            d["every"] = self.every_s
        if self.at:
            d["at"] = self.at.astimezone(self.zone).isoformat()
        return d

    def describe(self) -> str:
        if self.cron:
            return f"cron '{self.cron}' ({self.tz})"
        if self.every_s:
            return f"every {self.every_s}s"
        assert self.at is not None
        return f"once at {self.at.astimezone(self.zone).isoformat()}"


def parse_timing(*, cron: str | None = None, every: Any = None, at: Any = None, tz: str | None = None) -> Timing:
    """Validate a timing; :class:`InvalidInput` names the field that is wrong."""
    given = [name for name, v in (("cron", cron), ("every", every), ("at", at)) if v not in (None, "")]
    if len(given) != 1:
        raise InvalidInput("give exactly one of cron, every or at")
    tz = tz or "UTC"
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidInput(f"tz: unknown timezone {tz!r}") from exc
    if cron:
        if not isinstance(cron, str) or len(cron.split()) != 5 or not croniter.is_valid(cron):
            raise InvalidInput(f"cron: {cron!r} is not a five-field cron expression (minute hour day month weekday)")
        return Timing(cron=" ".join(cron.split()), tz=tz)
    if every not in (None, ""):
        try:
            seconds = parse_duration(every)
        except ValueError as exc:
            raise InvalidInput(f"every: {exc}") from exc
        if seconds < 1 or seconds != int(seconds):
            raise InvalidInput(f"every: must be a whole number of seconds, at least 1, not {every!r}")
        return Timing(every_s=int(seconds), tz=tz)
    when = _parse_datetime(at, zone)
    return Timing(at=when.replace(microsecond=0), tz=tz)


def _parse_datetime(value: Any, zone: ZoneInfo) -> datetime:
    if isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        except ValueError as exc:
            raise InvalidInput(f"at: {value!r} is not an ISO 8601 date-time such as 2026-05-05T09:00") from exc
    return dt.replace(tzinfo=zone) if dt.tzinfo is None else dt


def slot_id(slot: datetime) -> str:
    """A slot as it appears in run and utterance ids: UTC, compact, e.g. ``20260505T070000Z``."""
    return slot.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def parse_slot_id(value: str) -> datetime:
    """Inverse of :func:`slot_id`; also accepts ISO 8601."""
    try:
        return datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return _parse_datetime(value, ZoneInfo("UTC")).astimezone(UTC)


def latest_slot(timing: Timing, anchor: float, now: datetime) -> datetime | None:
    """The latest slot at or before ``now`` (UTC), or None; ``anchor`` is the ``every`` grid origin."""
    if timing.at is not None:
        return timing.at.astimezone(UTC) if timing.at <= now else None
    if timing.every_s:
        origin = math.floor(anchor)
        k = math.floor((now.timestamp() - origin) / timing.every_s)
        return datetime.fromtimestamp(origin + k * timing.every_s, UTC) if k >= 0 else None
    assert timing.cron is not None
    local = now.astimezone(timing.zone).replace(second=0, microsecond=0)
    if croniter.match(timing.cron, local):
        return local.astimezone(UTC)
    prev: datetime = croniter(timing.cron, local).get_prev(datetime)
    return prev.astimezone(UTC)


def next_slot(timing: Timing, anchor: float, after: datetime) -> datetime | None:
    """The first slot strictly after ``after``, or None (a one-off that has passed)."""
    if timing.at is not None:
        return timing.at.astimezone(UTC) if timing.at > after else None
    if timing.every_s:
        origin = math.floor(anchor)
        k = max(0, math.floor((after.timestamp() - origin) / timing.every_s) + 1)
        return datetime.fromtimestamp(origin + k * timing.every_s, UTC)
    assert timing.cron is not None
    nxt: datetime = croniter(timing.cron, after.astimezone(timing.zone)).get_next(datetime)
    return nxt.astimezone(UTC)


def is_slot(timing: Timing, anchor: float, slot: datetime) -> bool:
    """Whether ``slot`` is one of the timing's slots."""
    return latest_slot(timing, anchor, slot) == slot.astimezone(UTC)


def _whole_hour_offsets(zone: ZoneInfo, start: datetime) -> bool:
    for week in range(0, 60):
        offset = (start + timedelta(weeks=week)).astimezone(zone).utcoffset() or timedelta(0)
        if offset.total_seconds() % 3600:
            return False
    return True


def trigger(timing: Timing, beat_app: Celery) -> Any:
    """The RedBeat schedule that publishes this timing's firings (a superset for cron)."""
    if timing.every_s:
        return interval_schedule(run_every=timedelta(seconds=timing.every_s), app=beat_app)
    if timing.at is not None:
        from redbeat.schedules import rrule

        return rrule("SECONDLY", dtstart=timing.at.astimezone(UTC), count=1, app=beat_app)
    assert timing.cron is not None
    minute = timing.cron.split()[0]
    if minute != "*" and _whole_hour_offsets(timing.zone, datetime.now(UTC)):
        try:
            return crontab(minute=minute, app=beat_app)
        except ValueError:
            pass  # croniter syntax crontab does not read: every minute, filtered by the task
    return crontab(minute="*", app=beat_app)


# schedules -----------------------------------------------------------------------------------


class Schedules:
    """The schedule store: add, list, get, update, pause, resume, remove, history; and firings."""

    def __init__(self, redis_client: redis.Redis | None = None, *, settings: Settings | None = None,
                 runner: Runner | None = None) -> None:
        self.settings = settings or get_settings()
        self.r = redis_client or redis.Redis.from_url(self.settings.redis_url)
        self.runner = runner or Runner(self.r, settings=self.settings)
        from producer.schedule_tasks import configure_redbeat

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

        from producer.schedule_tasks import TASK_FIRE

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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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


# runs ----------------------------------------------------------------------------------------


@dataclass
class _LineState:
    n: int
    utterance_id: str
    kind: str
    queued_at: float | None = None
    error: str | None = None


class Runner:
    """Runs scripts: creates run records, enqueues lines when they are due, reports progress."""

    def __init__(self, redis_client: redis.Redis | None = None, *, settings: Settings | None = None,
                 client: Any = None) -> None:
        self.settings = settings or get_settings()
        self.r = redis_client or redis.Redis.from_url(self.settings.redis_url)
        self._client = client
        self._release = self.r.register_script(_RELEASE)

    _default: Runner | None = None

    @classmethod
    def default(cls) -> Runner:
        """A process-wide runner on the configured Redis."""
        if cls._default is None:
            cls._default = cls()
        return cls._default

    @property
    def client(self) -> Any:
        if self._client is None:
            from .client import EchoqClient

            self._client = EchoqClient(redis_client=self.r, settings=self.settings)
        return self._client

    def start(self, script: Script, *, run_id: str | None = None, schedule_id: str | None = None,
              slot: float | None = None, fired_at: float | None = None, late_s: float = 0.0) -> dict[str, Any]:
        """Create the run (once: ``created`` is False when ``run_id`` already exists) and advance it."""
        rid = run_id or f"run:{uuid.uuid4().hex[:16]}"
        now = time.time()
        if script.target.conversation_id is not None:
            # fail before anything is written when the conversation is not open
            self._check_open(script.target.conversation_id)
        lines = [asdict(_LineState(ln.number, f"{rid}:{ln.number}", ln.kind)) for ln in script.lines]
        rec = {"id": rid, "schedule_id": schedule_id, "slot": slot, "fired_at": fired_at or now, "late_s": late_s,
               "created_at": now, "started_at": now, "state": "running", "script": script.to_dict(),
               "conversation_id": script.target.conversation_id, "next": 0, "lines": lines, "error": None}
        if not self.r.set(run_key(rid), json.dumps(rec), nx=True):
            return {**(self.status(rid) or {"id": rid}), "created": False}
        self.r.zadd(RUNS_DUE, {rid: now})
        self.advance(rid)
        return {**(self.status(rid) or rec), "created": True}

    def record_outcome(self, run_id: str, schedule_id: str, slot: float, now: float, late: float, state: str,
                       reason: str) -> bool:
        """Record a firing that sent nothing (``skipped``: missed past its grace window; ``failed``:
        the conversation is not open); False when the slot already has a run."""
        rec = {"id": run_id, "schedule_id": schedule_id, "slot": slot, "fired_at": now, "late_s": late,
               "created_at": now, "finished_at": now, "state": state, "error": reason, "lines": [], "next": 0}
        return bool(self.r.set(run_key(run_id), json.dumps(rec), nx=True))

    def _check_open(self, conversation_id: str) -> None:
        conv = self.client.store.conversation(conversation_id)
        if conv is None:
            raise UnknownConversation(f"no conversation {conversation_id!r}; open it first")
        if conv.get("state") != "open":
            raise UnknownConversation(f"conversation {conversation_id!r} is {conv.get('state')}")

    def status(self, run_id: str) -> dict[str, Any] | None:
        """The run with each line's utterance state and timings; None when there is no such run."""
        raw = self.r.get(run_key(run_id))
        if not raw:
            return None
        rec: dict[str, Any] = json.loads(raw)
        rec.pop("script", None)
        for line in rec.get("lines", []):
            utt = self.r.hgetall(keys.utterance(line["utterance_id"])) if line.get("queued_at") else {}
            u = {_text(k): _text(v) for k, v in utt.items()}
            line["state"] = u.get("state", "failed" if line.get("error") else "pending")
            for k in ("sent_at", "spoken_at", "finished_at"):
                if u.get(k):
                    line[k] = float(u[k])
            if u.get("error") and not line.get("error"):
                line["error"] = u["error"]
        return rec

    def pump(self, now: float | None = None, limit: int = 200) -> int:
        """Advance every run that is due; returns how many were looked at."""
        t = time.time() if now is None else now
        due = [_text(m) for m in self.r.zrangebyscore(RUNS_DUE, "-inf", t, start=0, num=limit)]
        for run_id in due:
            self.advance(run_id)
        return len(due)

    def hinted(self, run_id: str) -> dict[str, Any]:
        """A run's own pump message arrived: forget it was pending, then advance the run."""
        self.r.delete(_hint_key(run_id))
        return self.advance(run_id)

    def advance(self, run_id: str) -> dict[str, Any]:
        """Enqueue every line of the run that is due, then note when to look again. Never sleeps."""
        token = uuid.uuid4().hex
        if not self.r.set(_lock_key(run_id), token, nx=True, px=RUN_LOCK_MS):
            # The holder books the next look, but it may already have seen an older pump message
            # in flight (this one, say) and booked nothing: make sure a pump comes again soon.
            self._hint(run_id, time.time() + BUSY_RETRY_S)
            return {"id": run_id, "state": "busy"}
        try:
            raw = self.r.get(run_key(run_id))
            if not raw:
                self.r.zrem(RUNS_DUE, run_id)
                return {"id": run_id, "state": "gone"}
            rec = json.loads(raw)
            if rec["state"] != "running":
                self.r.zrem(RUNS_DUE, run_id)
                return rec
            again = self._step(rec)
            self.r.set(run_key(run_id), json.dumps(rec))
            if again is None:
                self.r.zrem(RUNS_DUE, run_id)
            else:
                self.r.zadd(RUNS_DUE, {run_id: again})
                self._hint(run_id, again)
            return rec
        finally:
            self._release(keys=[_lock_key(run_id)], args=[token])

    # internals -----------------------------------------------------------------------------

    def _step(self, rec: dict[str, Any]) -> float | None:
        """Enqueue due lines; when to look again (None: the run is over)."""
        script = parse_script(rec["script"], source=f"run {rec['id']}", check_audio=False)
        now = time.time()
        if rec.get("conversation_id") is None:
            try:
                rec["conversation_id"] = self._create_conversation(script, rec["id"])
            except EchoqError as exc:
                return self._finish(rec, "failed", f"could not create the conversation: {exc}")
        conv = rec["conversation_id"]
        lines = script.lines
        while rec["next"] < len(lines):
            i = rec["next"]
            due = self._due(rec, script, i)
            if due is None:
                return now + POLL_S
            if due > now:
                return due
            state = rec["lines"][i]
            try:
                self._enqueue(conv, lines[i], state["utterance_id"])
            except UnknownConversation as exc:
                return self._finish(rec, "failed", str(exc))
            except PermanentError as exc:
                state["error"] = str(exc)
            state["queued_at"] = time.time()
            rec["next"] = i + 1
        pending = [ln for ln in rec["lines"] if ln.get("queued_at") and not ln.get("error")
                   and self._utterance_state(ln["utterance_id"]) not in FINAL_STATES]
        if pending:
            return now + POLL_S
        return self._finish(rec, "done", None)

    def _due(self, rec: dict[str, Any], script: Script, i: int) -> float | None:
        line = script.lines[i]
        if line.at_s is not None:
            return float(rec["started_at"]) + line.at_s
        if i == 0:
            return float(rec["started_at"])
        prev, prev_state = script.lines[i - 1], rec["lines"][i - 1]
        if not prev.pause_s or prev_state.get("error"):
            return float(prev_state.get("queued_at") or rec["started_at"])
        utt = self.client.store.utterance(prev_state["utterance_id"]) or {}
        if utt.get("state") not in FINAL_STATES:
            return None
        ended = utt.get("sent_at") or utt.get("finished_at")
        return (float(ended) if ended else time.time()) + prev.pause_s

    def _enqueue(self, conversation_id: str, line: Any, utterance_id: str) -> None:
        if line.text is not None:
            self.client.say(conversation_id, line.text, utterance_id=utterance_id)
        else:
            self.client.play(conversation_id, line.audio, sample_rate=line.sample_rate, utterance_id=utterance_id)

    def _utterance_state(self, utterance_id: str) -> str | None:
        v = self.r.hget(keys.utterance(utterance_id), "state")
        return _text(v) if v else None

    def _create_conversation(self, script: Script, run_id: str) -> str:
        from .tavus import TavusClient

        target = script.target
        assert target.persona_id is not None
        with TavusClient.from_settings(self.settings) as tavus:
            conv = tavus.create_conversation(target.persona_id, replica_id=target.replica_id,
                                             conversation_name=target.name or f"echoq {run_id}",
                                             properties=target.properties or None)
        conv_id, url = str(conv["conversation_id"]), str(conv["conversation_url"])
        self.client.open(conv_id, url)
        return conv_id

    def _finish(self, rec: dict[str, Any], state: str, error: str | None) -> float | None:
        """Mark the run over; returns None (no need to look at it again)."""
        rec.update(state=state, error=error, finished_at=time.time())
        return None

    def _hint(self, run_id: str, due: float) -> None:
        """Publish this run's own pump message for ``due`` (chained when further than HINT_MAX_S),
        unless one is already on its way."""
        from producer.schedule_tasks import HINT_MAX_S, TASK_PUMP

        delay = min(max(0.0, due - time.time()), HINT_MAX_S)
        if self.r.set(_hint_key(run_id), "1", nx=True, px=int((delay + 2.0) * 1000)):
            self.client.app.send_task(TASK_PUMP, kwargs={"run_id": run_id}, countdown=delay,
                                      queue=keys.CONTROL_QUEUE, expires=delay + 60)


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
