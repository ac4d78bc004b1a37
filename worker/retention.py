"""Bounded Redis memory: a closed conversation's keys expire after ``ECHOQ_RETENTION_S``.

A conversation leaves behind its record, log, cursor and event stream, its wire-id index key
(:mod:`worker.wire_ids`, when Tavus's id differs from echoq's), one record, one
inference mapping and perhaps one audio blob per utterance, its queue's routing tables, and (for
loopback rooms) the room's streams. Once it is closed, all of them get a TTL of the retention setting, so ``echoq show``
and ``echoq status`` keep answering for a while and then the memory is given back. Doorbells
still waiting in the conversation's Celery queue are deleted at once: nobody consumes that
queue any more, and every one of them would only find nothing to do.

A doorbell published just as the conversation closed (a producer's close racing the owner's
own) and a room event written after it (a replica that stops speaking later) create their keys
anew, without a TTL; so the owner runs this a second time a little later
(:data:`SECOND_PASS_LEASES` lease TTLs after the close).

``EXPIRE … LT`` never lengthens a TTL already shorter (an audio blob's own), and a key that is
written after this (a late replica event) keeps the TTL, since only overwrites clear one.
Reopening the conversation makes its record, log, cursor and events permanent again
(:func:`keep_conversation`); utterance keys of the earlier log may expire, and nothing reads
them once their entries are behind the cursor.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from . import keys
from .store import text
from .wire_ids import index_key

#: the second pass over a closed conversation's keys comes this many lease TTLs after the close
SECOND_PASS_LEASES = 2
#: log entries read per round trip while collecting a closed conversation's utterance keys
_BATCH = 1000


def conversation_keys(conversation_id: str) -> list[str]:
    """The keys named after the conversation itself (its record, log, cursor and events)."""
    return [keys.conversation(conversation_id), keys.conv_log(conversation_id),
            keys.conv_cursor(conversation_id), keys.conv_events(conversation_id)]


def queue_keys(conversation_id: str) -> list[str]:
    """The Redis lists that hold the conversation queue's messages (kombu keeps one list per
    priority step; the plain name holds priority 0, the only one echoq uses)."""
    name = keys.conv_queue(conversation_id)
    return [name, *(f"{name}\x06\x16{pri}" for pri in (3, 6, 9))]


def binding_keys(conversation_id: str) -> list[str]:
    """kombu's routing tables for the conversation's queue (its exchange has the queue's name).

    They expire with the rest: a doorbell published through them after that is dropped, which
    only delays (the owner's supervisor rings whenever there is a backlog), and a worker that
    takes the conversation again declares them anew."""
    name = keys.conv_queue(conversation_id)
    return [f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}"]


def _utterance_keys(client: redis.Redis, conversation_id: str) -> list[str]:
    out: list[str] = []
    start = 0
    while True:
        raw: Any = client.lrange(keys.conv_log(conversation_id), start, start + _BATCH - 1)
        for item in raw:
            entry = json.loads(item)
            out += [keys.utterance(entry["utterance_id"]), keys.blob(entry["utterance_id"])]
            if entry.get("inference_id"):
                out.append(keys.inference(entry["inference_id"]))
        if len(raw) < _BATCH:
            return out
        start += _BATCH


def room_keys(url: str | None) -> list[str]:
    """A loopback room's streams (what was sent, room events, microphone frames); none for a
    Daily room. A room name shared by two conversations expires with the first one closed: use
    one room per conversation."""
    from .transports.loopback import parse_loopback_url

    if not url or not url.startswith("loopback://"):
        return []
    room, _options = parse_loopback_url(url)
    return [keys.loopback_room(room), keys.loopback_events(room), keys.loopback_mic(room)]


def expire_conversation(client: redis.Redis, conversation_id: str, retention_s: int, url: str | None = None) -> int:
    """Give every key of a closed conversation a TTL of at most ``retention_s`` and delete its
    leftover doorbells; returns how many keys now expire (0 when it was reopened). ``url`` is the
    room's, for a pass that may come after the record itself has expired."""
    reply: Any = client.hmget(keys.conversation(conversation_id), ["state", "url", "wire_id"])
    state, stored_url, wire_id = (text(v) if v is not None else None for v in reply)
    if state is not None and state != "closed":
        return 0
    names = conversation_keys(conversation_id) + binding_keys(conversation_id) + room_keys(stored_url or url)
    names += index_key(client, conversation_id, wire_id)
    names += _utterance_keys(client, conversation_id)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.expire(name, retention_s, lt=True)
    pipe.delete(*queue_keys(conversation_id))
    replies = pipe.execute()
    return sum(1 for r in replies[:-1] if r)


def keep_conversation(client: redis.Redis, conversation_id: str) -> None:
    """A reopened conversation keeps its record, log, cursor, events and queue bindings for as
    long as it is open."""
    pipe = client.pipeline(transaction=False)
    for name in conversation_keys(conversation_id) + binding_keys(conversation_id):
        pipe.persist(name)
    pipe.execute()
