"""Fencing a room that cannot check tokens: a local send deadline, and patience with Redis.

The cursor in Redis is fenced by the lease token, but a Daily room takes any message from any
process. A worker that was paused (SIGSTOP, a long GC, a stalled host) past its lease and then
resumes must not send even one more message, and it cannot ask Redis before every message
without doubling the round trips. So each session keeps a :class:`Fence`: the monotonic time
when its last successful renewal was *requested*, plus the lease TTL, minus a safety margin.
Measuring from the request (not the reply) makes the deadline err early: Redis set the TTL no
sooner than the request left. The sender checks the fence, with no Redis round trip, right
before every send; a process resumed after any pause longer than the margin finds it closed.

:func:`until_redis_answers` is the other half: once a message is in the room, recording that
fact is retried (with backoff) for as long as Redis is away, instead of sending the message
again later.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from .logs import step

log = logging.getLogger("echoq.fencing")

T = TypeVar("T")


class Fence:
    """The local deadline up to which this process may send into a conversation's room."""

    def __init__(self, ttl_s: float, margin_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.margin_s = margin_s
        self._clock = clock
        self._until = 0.0

    def renewed(self, requested_at: float) -> None:
        """The lease was taken or renewed by a request sent at ``requested_at`` (monotonic)."""
        # max(): the supervisor and the sender both renew; a late reply must not move it back
        self._until = max(self._until, requested_at + self.ttl_s - self.margin_s)

    def close(self) -> None:
        """Nothing goes out any more without a renewal first (the lease is let go or lost)."""
        self._until = float("-inf")

    def is_open(self) -> bool:
        """Whether a message may go out now."""
        return self._clock() < self._until

    def remaining(self) -> float:
        """Seconds left before the fence closes (negative once closed)."""
        return self._until - self._clock()


def until_redis_answers(call: Callable[[], T], *, what: str, conversation: str, wake: threading.Event,
                        give_up: Callable[[], bool], max_delay_s: float) -> T:
    """``call()``, retried with capped exponential backoff and jitter while Redis is unreachable.

    Used only for bookkeeping whose message is already in the room: repeating that message
    would be worse than waiting. ``give_up()`` (the worker is stopping) ends the wait by
    re-raising the Redis error; the next owner then resumes from the last recorded position.
    """
    attempt = 0
    while True:
        try:
            return call()
        except redis.RedisError as exc:
            if give_up():
                raise
            attempt += 1
            cap = min(max_delay_s, 0.02 * 2**attempt)
            delay = cap / 2 + random.uniform(0, cap / 2)
            if attempt == 1 or attempt % 20 == 0:
                step(log, "redis.retry", logging.WARNING, conversation=conversation, what=what, attempt=attempt,
                     reason=type(exc).__name__)
            if wake.wait(delay):
                wake.clear()
