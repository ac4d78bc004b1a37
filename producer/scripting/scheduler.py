"""``echoq beat``'s scheduler: RedBeat, with a safety-net pump published only when it is needed.

Script runs publish their own pump messages (short countdowns, see :mod:`producer.scripting.runs`);
beat's static pump entry is there for a run whose own message was lost. Publishing it every
second regardless would put one ``echoq.script.pump`` row a second in Flower and bury the
``echoq.drain`` rows people watch. So beat still looks every second, but publishes the pump only
when some run has been due for longer than that second — when a run's own message did not come.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from redbeat.schedulers import RedBeatScheduler, get_redis

from .beat import PUMP_ENTRY, PUMP_EVERY_S
from .runs import RUNS_DUE

__all__ = ["Scheduler", "overdue_runs"]


def overdue_runs(client: redis.Redis, now: float | None = None, grace_s: float = PUMP_EVERY_S) -> bool:
    """Whether a script run has been due for more than ``grace_s`` seconds (its own pump is late)."""
    t = time.time() if now is None else now
    return bool(client.zrangebyscore(RUNS_DUE, "-inf", t - grace_s, start=0, num=1))


class Scheduler(RedBeatScheduler):
    """RedBeat that skips the safety-net pump while no run is overdue."""

    def tick(self, *args: Any, **kwargs: Any) -> Any:
        # A stop signal can close the scheduler (which releases the lock and sets it to None)
        # between two ticks; RedBeat's tick would then extend a lock it no longer has and end
        # beat with a traceback. Closed is closed: publish nothing, let the loop see the stop.
        if self.lock_key and self.lock is None:
            return self.max_interval
        return super().tick(*args, **kwargs)

    def maybe_due(self, entry: Any, **kwargs: Any) -> Any:
        if entry.name == PUMP_ENTRY:
            is_due, next_time_to_run = entry.is_due()
            if is_due and not overdue_runs(get_redis(self.app)):
                # nothing to pump: look again in a second, publish nothing
                return next_time_to_run
        return super().maybe_due(entry, **kwargs)
