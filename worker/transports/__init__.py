"""Transports: Daily rooms and loopback rooms (Redis streams, for the replica simulator)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import EventHandler, Transport
from .urls import check_url, is_loopback

if TYPE_CHECKING:
    import redis

    from ..settings import Settings

__all__ = ["EventHandler", "Transport", "check_url", "open_transport"]


def open_transport(url: str, *, redis_client: redis.Redis, settings: Settings, on_event: EventHandler | None = None,
                   meeting_token: str | None = None) -> Transport:
    """A transport for ``url``, not yet joined. ``meeting_token`` joins a private Daily room."""
    check_url(url)
    if is_loopback(url):
        from .loopback import LoopbackTransport

        return LoopbackTransport(url, redis_client=redis_client, on_event=on_event)
    from .daily import DailyTransport

    return DailyTransport(url, settings=settings, on_event=on_event, meeting_token=meeting_token)
