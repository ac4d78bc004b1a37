"""Which echoq conversation speaks under a Tavus conversation id.

On the wire a conversation is Tavus's (its ``wire_id``), which differs from echoq's own id when
echoq opened a room Tavus created (``echoq open demo --url https://tavus.daily.co/c123``). Tavus's
quickstart body names Tavus's id, so ``open`` keeps an index key ``wire id -> echoq id`` whenever
the two differ; a reopen under another wire id drops the old key (when it still points here) and
a later conversation opened under the same wire id takes the key over (the last one opened wins).
The key expires with the conversation's other keys (:mod:`worker.retention`).
"""

from __future__ import annotations

from typing import Any

import redis

from . import keys
from .store import text

__all__ = ["point", "resolve", "index_key"]


def point(client: redis.Redis, conversation_id: str, wire_id: str, previous: str | None) -> None:
    """Index ``wire_id`` -> ``conversation_id`` (opened with it); ``previous`` is its wire id before."""
    pipe = client.pipeline(transaction=False)
    if previous and previous != wire_id and _target(client, previous) == conversation_id:
        pipe.delete(keys.wire(previous))
    if wire_id != conversation_id:
        pipe.set(keys.wire(wire_id), conversation_id)  # a plain SET also drops a TTL from a closed holder
    pipe.execute()


def resolve(client: redis.Redis, given: str) -> str:
    """The echoq id for ``given``: itself when echoq has an open conversation of that id, else the
    conversation indexed under it as its wire id (when that conversation still says so), else
    ``given`` unchanged (so an unknown id stays unknown)."""
    reply: Any = client.hget(keys.conversation(given), "state")
    if reply is not None and text(reply) == "open":
        return given
    target = _target(client, given)
    if target is not None:
        wire: Any = client.hget(keys.conversation(target), "wire_id")
        if wire is not None and text(wire) == given:
            return target
    return given


def index_key(client: redis.Redis, conversation_id: str, wire_id: str | None) -> list[str]:
    """The index key that points at ``conversation_id``, if any (for retention to expire)."""
    if not wire_id or wire_id == conversation_id or _target(client, wire_id) != conversation_id:
        return []
    return [keys.wire(wire_id)]


def _target(client: redis.Redis, wire_id: str) -> str | None:
    reply: Any = client.get(keys.wire(wire_id))
    return text(reply) if reply is not None else None
