"""Script runs: run records, and the engine that enqueues their lines when they are due.


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

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import redis

from worker import keys, redisio
from worker.errors import EchoqError, PermanentError, UnknownConversation
from worker.settings import Settings, get_settings
from worker.store import FINAL_STATES

from ..records import utterance_record
from .script import Script, parse_script

__all__ = ["Runner", "run_key", "RUNS_DUE", "POLL_S", "BUSY_RETRY_S", "RUN_LOCK_MS", "PENDING_LINE_STATES"]

#: how often a run looks at the line it waits on to be sent
POLL_S = 0.25
#: when a pump finds its run busy, how soon another one looks
BUSY_RETRY_S = 0.2
#: a run that holds its lock longer than this is presumed dead
RUN_LOCK_MS = 30_000
RUNS_DUE = "echoq:runs:due"
PENDING_LINE_STATES = ("queued", "sending")

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def run_key(run_id: str) -> str:
    """String: the run record (JSON)."""
    return f"echoq:run:{run_id}"


def _lock_key(run_id: str) -> str:
    return f"echoq:run:{run_id}:lock"


def _hint_key(run_id: str) -> str:
    return f"echoq:run:{run_id}:hint"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
        self.r = redis_client or redisio.connect(self.settings.redis_url)
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
            from ..client import EchoqClient

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
            u = utterance_record({_text(k): _text(v) for k, v in utt.items()})
            line["state"] = u.get("state", "failed" if line.get("error") else "pending")
            for k in ("sent_at", "spoken_at", "finished_at"):
                if u.get(k) is not None:
                    line[k] = u[k]
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
            # text lines due now and back to back (no pause, no time of their own) go as one batch
            batch = [i]
            while (lines[i].text is not None and batch[-1] + 1 < len(lines) and lines[batch[-1] + 1].text is not None
                   and lines[batch[-1] + 1].at_s is None and not lines[batch[-1]].pause_s):
                batch.append(batch[-1] + 1)
            try:
                if len(batch) > 1 and self._enqueue_batch(conv, rec, batch, lines):
                    continue
                state = rec["lines"][i]
                try:
                    self._enqueue(conv, lines[i], state["utterance_id"])
                except PermanentError as exc:
                    if isinstance(exc, UnknownConversation):
                        raise
                    state["error"] = str(exc)
            except UnknownConversation as exc:
                return self._finish(rec, "failed", str(exc))
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

    def _enqueue_batch(self, conversation_id: str, rec: dict[str, Any], batch: list[int], lines: Any) -> bool:
        """Enqueue the text lines ``batch`` with one call; False (nothing enqueued) when one of
        them is refused, so that each line is then enqueued alone and gets its own error."""
        states = [rec["lines"][i] for i in batch]
        try:
            self.client.say_many(conversation_id, [lines[i].text for i in batch],
                                 utterance_ids=[st["utterance_id"] for st in states])
        except UnknownConversation:
            raise
        except PermanentError:
            return False
        now = time.time()
        for st in states:
            st["queued_at"] = now
        rec["next"] = batch[-1] + 1
        return True

    def _enqueue(self, conversation_id: str, line: Any, utterance_id: str) -> None:
        if line.text is not None:
            self.client.say(conversation_id, line.text, utterance_id=utterance_id)
        else:
            self.client.play(conversation_id, line.audio, sample_rate=line.sample_rate, utterance_id=utterance_id)

    def _utterance_state(self, utterance_id: str) -> str | None:
        v = self.r.hget(keys.utterance(utterance_id), "state")
        return _text(v) if v else None

    def _create_conversation(self, script: Script, run_id: str) -> str:
        from ..tavus import TavusClient

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
        from producer.scripting.beat import HINT_MAX_S, TASK_PUMP

        delay = min(max(0.0, due - time.time()), HINT_MAX_S)
        if self.r.set(_hint_key(run_id), "1", nx=True, px=int((delay + 2.0) * 1000)):
            self.client.app.send_task(TASK_PUMP, kwargs={"run_id": run_id}, countdown=delay,
                                      queue=keys.CONTROL_QUEUE, expires=delay + 60)
