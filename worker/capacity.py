"""How many conversations a worker may hold, and saying so when none can take one.

**The rule.** In real-time pacing echo audio is sent by the process's one pacing loop
(:mod:`worker.pacing`): a playing conversation holds no thread of the pool, and
``ECHOQ_MAX_SESSIONS`` alone limits a worker, as in ``burst`` pacing, where a sender gives its
thread back as soon as the room has taken the messages. A sender that paces in real time on a
thread of its own — a microphone conversation, or any conversation with
``ECHOQ_PACING_LOOP=false`` — keeps that thread for as long as an utterance plays, so a worker
holds at most ``threads - CONTROL_THREADS`` of those, and opens, interrupts, closes and script
pumps always find a free thread.

**Waiting, never silent.** Workers publish ``sessions`` and their limit in :data:`keys.WORKERS`
every scan. A conversation that nobody owns while every live worker is at its limit is marked
``waiting`` with a reason (a field of its record, and one ``conversation.waiting`` event), which
``echoq show``, the API and the event stream show; the worker that takes it clears the field.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from . import keys
from .settings import Settings
from .store import EVENTS_MAXLEN

#: threads a worker keeps free of real-time senders, for control tasks
CONTROL_THREADS = 2
#: a worker whose heartbeat is older than this many scan intervals (at least 5 s) is not counted
STALE_SCANS = 5

REASON_NO_WORKER = "no worker is running"
REASON_FULL = ("every worker is at its session limit (ECHOQ_MAX_SESSIONS; threads - 2 for microphone conversations, "
               "and for every conversation in realtime pacing with ECHOQ_PACING_LOOP=false)")

# KEYS: conversation, events ; ARGV: reason, now — marks an unowned, not closed conversation
# waiting once (1), or leaves it as it is (0)
_MARK_WAITING = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'closed' then return 0 end
local current = redis.call('HGET', KEYS[1], 'waiting')
if current and current ~= '' then return 0 end
redis.call('HSET', KEYS[1], 'waiting', ARGV[1], 'waiting_since', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[3]), '*', 'data',
  cjson.encode({type='conversation.waiting', reason=ARGV[1], ts=tonumber(ARGV[2])}))
return 1
"""


def realtime_slots(threads: int) -> int:
    """Conversations pacing in real time that a worker with ``threads`` threads can serve."""
    return max(1, threads - CONTROL_THREADS)


def session_limit(settings: Settings, threads: int) -> int:
    """The most conversations one worker holds at the configured pacing (see the module doc)."""
    if settings.pacing == "realtime" and not settings.pacing_loop:
        return min(settings.max_sessions, realtime_slots(threads))
    return settings.max_sessions


def paces_in_real_time(settings: Settings, mode: str) -> bool:
    """Whether a conversation in ``mode`` sends its audio at real time."""
    return settings.pacing == "realtime" or mode == "microphone"


def holds_a_thread(settings: Settings, mode: str) -> bool:
    """Whether a conversation in ``mode`` holds a thread while it plays (in real-time pacing the
    pacing loop sends echo audio, unless ``ECHOQ_PACING_LOOP=false``)."""
    return (settings.pacing == "realtime" and not settings.pacing_loop) or mode == "microphone"


@dataclass(frozen=True)
class Fleet:
    """What the live workers' heartbeats say about room for more conversations."""

    workers: int
    free: int

    @property
    def waiting_reason(self) -> str | None:
        """Why a new conversation would wait, or None when some worker has room."""
        if self.workers == 0:
            return REASON_NO_WORKER
        if self.free <= 0:
            return REASON_FULL
        return None


def fleet(client: redis.Redis, settings: Settings, now: float | None = None) -> Fleet:
    """Count the live workers and their free session slots from :data:`keys.WORKERS`."""
    now = time.time() if now is None else now
    stale_s = max(5.0, STALE_SCANS * settings.scan_interval_s)
    raw: Any = client.hgetall(keys.WORKERS)
    workers = free = 0
    for beat in raw.values():
        try:
            info = json.loads(beat)
        except ValueError:
            continue
        if now - float(info.get("ts", 0)) > stale_s or info.get("shutting_down"):
            continue
        workers += 1
        free += max(0, int(info.get("max_sessions", 0)) - len(info.get("sessions", [])))
    return Fleet(workers, free)


class Waiting:
    """Marks conversations waiting for a worker (once each) and lists the unowned ones."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._mark = client.register_script(_MARK_WAITING)

    def mark(self, conversation_id: str, reason: str) -> bool:
        """Mark the conversation waiting with ``reason``; True when this call marked it."""
        return bool(self._mark(keys=[keys.conversation(conversation_id), keys.conv_events(conversation_id)],
                               args=[reason, f"{time.time():.6f}", EVENTS_MAXLEN]))

    def unowned(self, conversation_ids: list[str]) -> list[str]:
        """The conversations among ``conversation_ids`` that no worker holds a lease on."""
        pipe = self.r.pipeline(transaction=False)
        for cid in conversation_ids:
            pipe.exists(keys.lease(cid))
        return [cid for cid, held in zip(conversation_ids, pipe.execute(), strict=True) if not held]
