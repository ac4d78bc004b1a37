"""The seam between the sender and a room: join, send, leave, and room events.

A transport is used by one sender at a time. ``send`` blocks until the room has taken the
message and raises a typed error from :mod:`worker.errors` when it has not. Room events (the
replica's app messages) are handed to ``on_event`` from whatever thread the transport reads on;
a handler only hands work off, it never blocks and never calls the transport back.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis

    from ..store import RoomAppend

EventHandler = Callable[[dict[str, Any]], None]

#: Events a transport adds to the room's own: the replica left the room, or (re)joined it.
REPLICA_LEFT = "echoq.replica.left"
REPLICA_JOINED = "echoq.replica.joined"


class Transport(abc.ABC):
    """A connection to one conversation's room."""

    def __init__(self, url: str, on_event: EventHandler | None = None) -> None:
        self.url = url
        self.on_event = on_event
        #: who sends (the lease token); a transport that keeps metadata beside each message
        #: records it there, never in the message itself
        self.origin = ""

    @abc.abstractmethod
    def join(self, timeout: float) -> None:
        """Join the room; :class:`~worker.errors.JoinFailed` when it fails or takes longer than ``timeout``."""

    @abc.abstractmethod
    def wait_for_replica(self, timeout: float) -> None:
        """Block until the replica is in the room; :class:`~worker.errors.ReplicaAbsent` after ``timeout``."""

    @abc.abstractmethod
    def send(self, message: dict[str, Any]) -> None:
        """Send one app message and wait until the room has taken it."""

    @abc.abstractmethod
    def leave(self) -> None:
        """Leave the room and free what the connection holds. Safe to call twice."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """Whether the room is joined and usable."""

    def rejoin(self, timeout: float) -> None:
        """Leave what is left of the connection and join again."""
        self.leave()
        self.join(timeout)

    def room_in(self, client: redis.Redis) -> bool:
        """Whether the room is a stream in ``client``'s Redis database, so that the sender can
        write each message in the same round trip as its cursor move (:meth:`prepare_append`)."""
        return False

    def prepare_append(self, message: dict[str, Any]) -> RoomAppend:
        """The write :meth:`send` would make, for the caller to make itself (rooms in Redis only)."""
        raise NotImplementedError(f"{type(self).__name__} is not a Redis stream")

    def write_frames(self, pcm: bytes, sample_rate: int) -> None:
        """Write s16le mono PCM to the room's microphone (microphone echo)."""
        raise NotImplementedError(f"{type(self).__name__} has no microphone")

    def _emit(self, event: dict[str, Any]) -> None:
        handler = self.on_event
        if handler is not None:
            handler(event)
