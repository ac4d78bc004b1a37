"""Conversation URLs: which kind of room, what logs may call it, and the secret it may carry.

A Daily room URL may carry a meeting token in its query (``?t=…``, Tavus's private rooms). The
token is a secret: it is split off before the URL is stored or logged, and rooms are named by
host and path only.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import InvalidInput

# The query parameters of a Daily room URL that carry a meeting token.
_TOKEN_PARAMS = ("t", "token")


def check_url(url: str) -> str:
    """Validate a conversation URL: ``https://…`` (a Daily room) or ``loopback://NAME``."""
    parts = urlsplit(url)
    if parts.scheme == "loopback":
        if not parts.netloc:
            raise InvalidInput(f"loopback URL needs a room name: loopback://NAME, not {url!r}")
        return url
    if parts.scheme in ("https", "http") and parts.netloc:
        return url
    raise InvalidInput(f"conversation url must be https://… (a Daily room) or loopback://NAME, not {room_label(url)!r}")


def is_loopback(url: str) -> bool:
    """Whether ``url`` names a loopback room (the simulator's), not a Daily one."""
    return urlsplit(url).scheme == "loopback"


def split_token(url: str) -> tuple[str, str | None]:
    """The room URL without its token parameter, and the meeting token if the URL had one."""
    parts = urlsplit(url)
    token = None
    kept = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in _TOKEN_PARAMS and value:
            token = value
        else:
            kept.append((key, value))
    if token is None:
        return url, None
    return urlunsplit(parts._replace(query=urlencode(kept))), token


def room_label(url: str) -> str:
    """``host/path`` of a room URL: what logs and errors call the room (no query, no token)."""
    parts = urlsplit(url)
    return f"{parts.netloc}{parts.path}"


def tavus_conversation_id(url: str) -> str | None:
    """The Tavus conversation id a room URL names: its last path segment
    (``https://tavus.daily.co/<conversation_id>``); None for loopback rooms or an empty path."""
    parts = urlsplit(url)
    if parts.scheme == "loopback":
        return None
    segments = [s for s in parts.path.split("/") if s]
    return segments[-1] if segments else None
