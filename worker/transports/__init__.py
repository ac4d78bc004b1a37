"""Transports: Daily rooms and loopback rooms (Redis streams, for the replica simulator)."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..errors import InvalidInput
from .base import EventHandler, Transport

if TYPE_CHECKING:
    import redis

    from ..settings import Settings

__all__ = ["EventHandler", "Transport", "check_url", "open_transport"]


def check_url(url: str) -> str:
    """Validate a conversation URL: ``https://…`` (a Daily room) or ``loopback://NAME``."""
    parts = urlsplit(url)
    if parts.scheme == "loopback":
        if not parts.netloc:
            raise InvalidInput("loopback URL needs a room name: loopback://NAME")
        return url
    if parts.scheme in ("https", "http") and parts.netloc:
        return url
    # Not echoed back: a room URL may carry a meeting token in its query.
    raise InvalidInput(f"conversation url must be https://… (a Daily room) or loopback://NAME, "
                       f"not a {parts.scheme or 'schemeless'}: URL")


def open_transport(url: str, *, redis_client: redis.Redis, settings: Settings, on_event: EventHandler | None = None) -> Transport:
    """A transport for ``url``, not yet joined."""
    scheme = urlsplit(check_url(url)).scheme
    if scheme == "loopback":
        from .loopback import LoopbackTransport

        return LoopbackTransport(url, redis_client=redis_client, on_event=on_event)
    from .daily import DailyTransport

    return DailyTransport(url, settings=settings, on_event=on_event)
