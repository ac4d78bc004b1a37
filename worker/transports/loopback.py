"""Loopback rooms: app messages go to a Redis stream that the replica simulator reads.

``loopback://NAME`` appends each message, exactly the dict that would be passed to Daily's
``send_app_message``, as JSON to the stream ``echoq:loopback:NAME`` (field ``data``), and reads
room events from ``echoq:loopback:NAME:events``.

Faults are injected through the URL's query, so tests can drive every retry path:

=================  ==========================================================================
``fail_rate=F``    each send fails (``SendFailed``, nothing appended) with probability F
``disconnect_after=N``  after N messages on one join the connection drops (``RoomDisconnected``)
                   until the next join
``max_bytes=N``    messages over N bytes are refused (``MessageTooLarge``)
``max_rate=R``     more than R messages in one second are refused (``RateLimited``)
``join_delay=S``   a join takes S seconds; ``join_fail=1`` makes it fail after that
``send_delay=S``   each message takes S seconds to go (a room slower than real time)
``replica=0``      do not wait for the simulator before the first send
``seed=N``         seed of the fault dice
=================  ==========================================================================
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis

from .. import keys
from ..echo import encode
from ..errors import (
    InvalidInput,
    JoinFailed,
    MessageTooLarge,
    RateLimited,
    ReplicaAbsent,
    RoomDisconnected,
    SendFailed,
)
from ..store import SENT_BEFORE, RoomAppend
from .base import EventHandler, Transport

log = logging.getLogger("echoq.loopback")

# A send whose reply was lost (Redis stalled past the client's socket timeout, and ran it later)
# is retried by the sender; a room takes one send once, so the retry must not append again. The
# retry carries the same send id, and the recent entries are looked at for it.
# KEYS: stream ; ARGV: data, origin, send id, "1" when a send with this id lost its reply
_APPEND_ONCE = SENT_BEFORE + """
if ARGV[4] == '1' and sent_before(KEYS[1], ARGV[3]) then return 0 end
redis.call('XADD', KEYS[1], '*', 'data', ARGV[1], 'origin', ARGV[2], 'send_id', ARGV[3])
return 1
"""


def parse_loopback_url(url: str) -> tuple[str, dict[str, str]]:
    """The room name and the fault options of a ``loopback://`` URL."""
    parts = urlsplit(url)
    if parts.scheme != "loopback" or not parts.netloc:
        raise InvalidInput(f"not a loopback URL: {url!r}")
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    known = {"fail_rate", "disconnect_after", "max_bytes", "max_rate", "join_delay", "join_fail", "send_delay", "replica",
             "seed"}
    unknown = set(options) - known
    if unknown:
        raise InvalidInput(f"unknown loopback option(s) {sorted(unknown)}; known: {sorted(known)}")
    return parts.netloc, options


class LoopbackTransport(Transport):
    """A room that is a pair of Redis streams."""

    def __init__(self, url: str, *, redis_client: redis.Redis, on_event: EventHandler | None = None) -> None:
        super().__init__(url, on_event)
        self.room, opts = parse_loopback_url(url)
        try:
            self.fail_rate = float(opts.get("fail_rate", 0))
            self.disconnect_after = int(opts.get("disconnect_after", 0))
            self.max_bytes = int(opts.get("max_bytes", 0))
            self.max_rate = float(opts.get("max_rate", 0))
            self.join_delay = float(opts.get("join_delay", 0))
            self.send_delay = float(opts.get("send_delay", 0))
            self.join_fail = opts.get("join_fail", "0") not in ("0", "", "false")
            self.wait_replica = opts.get("replica", "1") not in ("0", "false")
            seed = opts.get("seed")
        except ValueError as exc:
            raise InvalidInput(f"bad loopback option in {url!r}: {exc}") from exc
        self._dice = random.Random(int(seed) if seed is not None else None)
        self._redis = redis_client
        self._stream = keys.loopback_room(self.room)
        self._joined = False
        self._sent_on_join = 0
        self._recent: deque[float] = deque()
        self._append = redis_client.register_script(_APPEND_ONCE)
        self._send_prefix = uuid.uuid4().hex[:8]
        self._sends = 0
        # the message whose append may or may not have happened (its reply was lost), and its id
        self._unsure: tuple[dict[str, Any], str] | None = None

    @property
    def connected(self) -> bool:
        return self._joined

    def join(self, timeout: float) -> None:
        if self.join_delay:
            time.sleep(min(self.join_delay, timeout))
            if self.join_delay > timeout:
                raise JoinFailed(f"join of loopback room {self.room!r} timed out after {timeout:.1f}s")
        if self.join_fail:
            raise JoinFailed(f"join of loopback room {self.room!r} failed (injected)")
        try:
            self._redis.sadd(keys.LOOPBACK_ROOMS, self.room)
        except redis.RedisError as exc:
            raise JoinFailed(f"loopback room {self.room!r}: {exc}") from exc
        self._sent_on_join = 0
        self._joined = True
        _hub(self._redis).watch(self)
        log.debug("joined loopback room %s", self.room)

    def wait_for_replica(self, timeout: float) -> None:
        if not self.wait_replica:
            return
        deadline = time.monotonic() + timeout
        while not self._redis.exists(keys.SIMULATOR_ALIVE):
            if time.monotonic() >= deadline:
                raise ReplicaAbsent(f"no replica simulator answered in loopback room {self.room!r} within {timeout:.1f}s")
            time.sleep(0.05)

    def send(self, message: dict[str, Any]) -> None:
        data, send_id = self._checked(message)
        retried = self._unsure is not None and self._unsure[1] == send_id
        try:
            # origin beside data: tests tell which process sent what; the message stays the wire
            # message. Only the retry of a send whose reply was lost looks for it in the room.
            self._append(keys=[self._stream], args=[data, self.origin, send_id, "1" if retried else ""])
        except redis.RedisError as exc:
            self._unsure = (message, send_id)
            raise SendFailed(f"loopback room {self.room!r}: {exc}") from exc
        self._unsure = None
        self._sent_on_join += 1

    def room_in(self, client: redis.Redis) -> bool:
        """The room is a stream on ``client``'s server and database."""
        return client.connection_pool.connection_kwargs == self._redis.connection_pool.connection_kwargs

    def prepare_append(self, message: dict[str, Any]) -> RoomAppend:
        """The room's side of a send whose write the caller makes itself (in its cursor move):
        the injected faults happen here as in :meth:`send`; the write is the caller's to retry
        with the same send id until Redis answers."""
        data, send_id = self._checked(message)
        self._sent_on_join += 1
        return RoomAppend(self._stream, data, self.origin, send_id)

    def _checked(self, message: dict[str, Any]) -> tuple[bytes, str]:
        """The encoded message and its send id, once the room's injected faults let it go."""
        if not self._joined:
            raise RoomDisconnected(f"loopback room {self.room!r} is not joined")
        if self.send_delay:
            time.sleep(self.send_delay)
        data = encode(message)
        if self.max_bytes and len(data) > self.max_bytes:
            raise MessageTooLarge(f"message is {len(data)} bytes, room limit {self.max_bytes}")
        if self.disconnect_after and self._sent_on_join >= self.disconnect_after:
            self._joined = False
            raise RoomDisconnected(f"loopback room {self.room!r} dropped the connection (injected)")
        if self.max_rate:
            now = time.monotonic()
            while self._recent and now - self._recent[0] >= 1.0:
                self._recent.popleft()
            if len(self._recent) >= self.max_rate:
                raise RateLimited(f"loopback room {self.room!r} allows {self.max_rate:g} messages/s")
            self._recent.append(now)
        if self.fail_rate and self._dice.random() < self.fail_rate:
            raise SendFailed(f"send to loopback room {self.room!r} failed (injected)")
        if self._unsure is not None and self._unsure[0] is message:
            return data, self._unsure[1]  # the retry of a send whose outcome is unknown
        self._sends += 1
        return data, f"{self._send_prefix}:{self._sends}"

    def write_frames(self, pcm: bytes, sample_rate: int) -> None:
        if not self._joined:
            raise RoomDisconnected(f"loopback room {self.room!r} is not joined")
        try:
            self._redis.xadd(
                keys.loopback_mic(self.room),
                {"pcm": pcm, "sample_rate": sample_rate, "t": f"{time.time():.6f}"},
            )
        except redis.RedisError as exc:
            raise SendFailed(f"loopback room {self.room!r}: {exc}") from exc

    def leave(self) -> None:
        if self._joined:
            log.debug("left loopback room %s", self.room)
        self._joined = False
        _hub(self._redis).unwatch(self)


class _EventHub:
    """One thread per process that reads the event streams of every joined loopback room."""

    def __init__(self, client: redis.Redis) -> None:
        # a connection of its own: the blocking read must not hold one the senders need
        pool = client.connection_pool
        self._redis = redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, **pool.connection_kwargs))
        self._lock = threading.Lock()
        self._rooms: dict[str, list[LoopbackTransport]] = {}
        self._last: dict[str, str] = {}
        self._thread: threading.Thread | None = None

    def watch(self, transport: LoopbackTransport) -> None:
        stream = keys.loopback_events(transport.room)
        with self._lock:
            if stream not in self._rooms:
                self._rooms[stream] = []
                last: Any = self._redis.xrevrange(stream, count=1)
                self._last[stream] = last[0][0].decode() if last else "0-0"
            if transport not in self._rooms[stream]:
                self._rooms[stream].append(transport)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="echoq-loopback-events", daemon=True)
                self._thread.start()

    def unwatch(self, transport: LoopbackTransport) -> None:
        stream = keys.loopback_events(transport.room)
        with self._lock:
            members = self._rooms.get(stream, [])
            if transport in members:
                members.remove(transport)
            if not members:
                self._rooms.pop(stream, None)
                self._last.pop(stream, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                streams = dict(self._last)
            if not streams:
                time.sleep(0.1)
                continue
            try:
                batches: Any = self._redis.xread(streams, block=200, count=100)  # type: ignore[arg-type]
            except redis.RedisError as exc:
                log.warning("loopback event read failed: %s", exc)
                time.sleep(0.5)
                continue
            for stream_b, entries in batches or []:
                stream = stream_b.decode()
                for entry_id, fields in entries:
                    with self._lock:
                        if stream in self._last:
                            self._last[stream] = entry_id.decode()
                        targets = list(self._rooms.get(stream, []))
                    try:
                        event = json.loads(fields[b"data"])
                    except (KeyError, ValueError):
                        continue
                    for t in targets:
                        try:
                            t._emit(event)
                        except Exception:  # a handler's bug must not stop the room's events
                            log.exception("loopback event handler failed")


_hubs: dict[int, _EventHub] = {}
_hubs_lock = threading.Lock()


def _hub(client: redis.Redis) -> _EventHub:
    key = id(client.connection_pool)
    with _hubs_lock:
        if key not in _hubs:
            _hubs[key] = _EventHub(client)
        return _hubs[key]
