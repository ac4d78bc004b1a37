"""The truth about every conversation, in Redis: the log, the cursor, utterance records, leases.

Each conversation has an append-only log whose entry ``seq`` (1, 2, …) is assigned atomically
at enqueue, and a cursor: the last fully handled ``seq`` and the next chunk of the entry after
it. Celery messages only ring the bell; whoever holds the conversation's lease sends every
entry after the cursor, in order, and moves the cursor after each acknowledged message. Cursor
moves are fenced by the lease token, so a worker that lost its lease cannot move it.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from . import keys

FINAL_STATES = ("sent", "spoken", "interrupted", "cancelled", "failed")
#: states after which ``--wait`` returns: the room has everything (or never will)
DELIVERED_STATES = ("sent", "spoken", "interrupted", "cancelled", "failed")
EVENTS_MAXLEN = 10_000

# KEYS: conversation, log, utterance, blob, inference, the staged blob (or none)
# ARGV: entry json (without seq), utterance id, (unused), (unused), inference id, now, record json
# The blob is written by a plain SET beside this script (same round trip) under a staged key that
# this script renames into place or deletes: a blob of megabytes passed to a script as an argument
# is copied twice more inside Redis.
_ENQUEUE = """
local function refuse(seq)
  if KEYS[6] then redis.call('DEL', KEYS[6]) end
  return {seq, 0}
end
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then return refuse(-1) end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return refuse(tonumber(redis.call('HGET', KEYS[3], 'seq')))
end
if redis.call('EXISTS', KEYS[5]) == 1 then return refuse(-2) end
local seq = redis.call('LLEN', KEYS[2]) + 1
local entry = cjson.decode(ARGV[1])
entry['seq'] = seq
redis.call('RPUSH', KEYS[2], cjson.encode(entry))
if KEYS[6] and redis.call('EXISTS', KEYS[6]) == 1 then redis.call('RENAME', KEYS[6], KEYS[4]) end
local rec = cjson.decode(ARGV[7])
for k, v in pairs(rec) do redis.call('HSET', KEYS[3], k, tostring(v)) end
redis.call('HSET', KEYS[3], 'seq', seq, 'state', 'queued', 'enqueued_at', ARGV[6])
redis.call('SET', KEYS[5], ARGV[2])
return {seq, 1}
"""

# A batch of text entries, all or none: nothing is written when the conversation is not open or
# an inference id is taken by another utterance. An utterance id already in the log keeps its seq.
# KEYS: conversation, log, then per item: utterance, inference
# ARGV: now, then per item: entry json (without seq), utterance id, inference id, record json
# Returns {-1, 0} (not open), {-2, item} (item's inference id taken; items count from 1), or
# {1, seq1, created1, seq2, created2, ...}.
_ENQUEUE_MANY = """
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then return {-1, 0} end
local n = (#ARGV - 1) / 4
for i = 1, n do
  if redis.call('EXISTS', KEYS[1 + 2 * i]) == 0 and redis.call('EXISTS', KEYS[2 + 2 * i]) == 1 then
    return {-2, i}
  end
end
local out = {1}
for i = 1, n do
  local ukey, a = KEYS[1 + 2 * i], 1 + 4 * (i - 1)
  if redis.call('EXISTS', ukey) == 1 then
    out[#out + 1] = tonumber(redis.call('HGET', ukey, 'seq'))
    out[#out + 1] = 0
  else
    local seq = redis.call('LLEN', KEYS[2]) + 1
    local entry = cjson.decode(ARGV[a + 1])
    entry['seq'] = seq
    redis.call('RPUSH', KEYS[2], cjson.encode(entry))
    for k, v in pairs(cjson.decode(ARGV[a + 4])) do redis.call('HSET', ukey, k, tostring(v)) end
    redis.call('HSET', ukey, 'seq', seq, 'state', 'queued', 'enqueued_at', ARGV[1])
    redis.call('SET', KEYS[2 + 2 * i], ARGV[a + 2])
    out[#out + 1] = seq
    out[#out + 1] = 1
  end
end
return out
"""

# KEYS: conversation, log, cursor, events ; ARGV: now, channel, conversation id
# Cancels every queued entry after the cursor and bumps the interrupt generation; the conversation
# id goes out on the interrupts channel, for its owner to look at once (a hint: see sessions).
_INTERRUPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local upto = redis.call('LLEN', KEYS[2])
local done = tonumber(redis.call('HGET', KEYS[3], 'seq') or '0')
local cancelled = 0
for i = done, upto - 1 do
  local entry = cjson.decode(redis.call('LINDEX', KEYS[2], i))
  local ukey = 'echoq:utt:' .. entry['utterance_id']
  if redis.call('HGET', ukey, 'state') == 'queued' then
    redis.call('HSET', ukey, 'state', 'cancelled', 'finished_at', ARGV[1], 'error', 'cancelled by interrupt')
    cancelled = cancelled + 1
  end
end
redis.call('HSET', KEYS[1], 'interrupt_upto', upto)
local gen = redis.call('HINCRBY', KEYS[1], 'interrupt_gen', 1)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', 10000, '*', 'data',
  cjson.encode({type='interrupt.requested', upto=upto, cancelled=cancelled, ts=tonumber(ARGV[1])}))
redis.call('PUBLISH', ARGV[2], ARGV[3])
return {gen, cancelled}
"""

# A lease that ran out while its holder could not reach Redis (an outage, a stall) may be taken
# back by that holder only if nobody took it since: every take and every release bumps the
# conversation's lease_epoch, and the holder presents the epoch it took.
# KEYS: lease, conversation ; ARGV: token, epoch, ttl ms
_LEASE_HELD = """
local function lease_held(token, epoch, ttl)
  local holder = redis.call('GET', KEYS[1])
  if holder == token then
    if ttl ~= '' then redis.call('PEXPIRE', KEYS[1], ttl) end
    return true
  end
  if holder or epoch == '' or ttl == '' then return false end
  if redis.call('HGET', KEYS[2], 'lease_epoch') ~= epoch then return false end
  redis.call('SET', KEYS[1], token, 'PX', ttl)
  return true
end
"""

# A room that is a Redis stream takes each send once: a send whose reply was lost is retried with
# the same send id, and the stream's newest entries are looked at for it first. Only such a retry
# looks (the caller knows which calls lost their reply): reading back 8 messages of ~3 KB into Lua
# cost about 120 us of Redis's time on every call, most of what a paced chunk costs Redis.
SENT_BEFORE = """
local function sent_before(stream, send_id)
  for _, entry in ipairs(redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 8)) do
    local f = entry[2]
    for i = 1, #f, 2 do
      if f[i] == 'send_id' and f[i + 1] == send_id then return true end
    end
  end
  return false
end
"""

# One round trip per message: the lease (checked, renewed), the interrupt generation, the room
# write when the room is a Redis stream, the cursor move and the record's running count.
# KEYS: lease, conversation, cursor, utterance, room stream
# ARGV: token, epoch-or-"", ttl-ms-or-"", seq, chunk, gen-or-"", refuse-above-gen-or-"",
#       chunks_sent-or-"", data-or-"", origin, send id, "1" when a call with this send id lost its reply
# Returns {held, interrupt_gen, moved}: {0, 0, 0} when the lease is lost (nothing written);
# {1, gen, 0} when an interrupt newer than ARGV[7] came (nothing written: the message is not
# sent); else {1, gen, 1}. A retried call whose message is in the room already appends nothing
# and leaves the cursor alone.
_ADVANCE = _LEASE_HELD + SENT_BEFORE + """
if not lease_held(ARGV[1], ARGV[2], ARGV[3]) then return {0, 0, 0} end
local current = tonumber(redis.call('HGET', KEYS[2], 'interrupt_gen') or '0')
local data = ARGV[9]
-- a retry after a lost reply: the first call wrote the message and moved the cursor with it, and
-- later moves may have passed that since (a batch retried whole): the cursor is left where it is
if data ~= '' and ARGV[12] == '1' and sent_before(KEYS[5], ARGV[11]) then return {1, current, 1} end
if data ~= '' and ARGV[7] ~= '' and current > tonumber(ARGV[7]) then return {1, current, 0} end
if data ~= '' then
  redis.call('XADD', KEYS[5], '*', 'data', data, 'origin', ARGV[10], 'send_id', ARGV[11])
end
redis.call('HSET', KEYS[3], 'seq', ARGV[4], 'chunk', ARGV[5])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[3], 'gen', ARGV[6]) end
if ARGV[8] ~= '' then redis.call('HSET', KEYS[4], 'chunks_sent', ARGV[8]) end
return {1, current, 1}
"""

# A run of text utterances in one round trip, all or none: the lease (checked, renewed), the
# interrupt generation, each message into the room stream, each record's claim and end with its
# two events, and the cursor past the run. An utterance cancelled (or ended) meanwhile is passed
# over, as a claim that fails is. A retry after a lost reply finds its messages in the room and
# writes nothing.
# KEYS: lease, conversation, cursor, room stream, events, then per item: utterance
# ARGV: token, epoch-or-"", ttl-ms, refuse-above-gen, origin, now, n,
#       then per item: seq, data, send id, "sending" event json, "sent" event json,
#       then "1" when a call with these send ids lost its reply (only then is the room looked at)
# Returns {0, 0, 0} when the lease is lost (nothing written); {1, gen, 0} when an interrupt newer
# than ARGV[4] came (nothing written); else {1, gen, 1, state1, ...}: each item's state after
# (sent, or the replica's outcome when it came first), "" for one passed over.
_SEND_TEXTS = _LEASE_HELD + """
if not lease_held(ARGV[1], ARGV[2], ARGV[3]) then return {0, 0, 0} end
local current = tonumber(redis.call('HGET', KEYS[2], 'interrupt_gen') or '0')
local n = tonumber(ARGV[7])
local seen = {}
if ARGV[8 + 5 * n] == '1' then
  for _, entry in ipairs(redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', n + 8)) do
    local f = entry[2]
    for i = 1, #f, 2 do
      if f[i] == 'send_id' then seen[f[i + 1]] = true end
    end
  end
end
local out = {1, current, 1}
for i = 1, n do
  if seen[ARGV[7 + 5 * (i - 1) + 3]] then
    -- written by this call before its reply was lost: report it, write nothing again
    for j = 1, n do
      local sent = seen[ARGV[7 + 5 * (j - 1) + 3]]
      out[3 + j] = sent and (redis.call('HGET', KEYS[5 + j], 'state') or '') or ''
    end
    return out
  end
end
if current > tonumber(ARGV[4]) then return {1, current, 0} end
for i = 1, n do
  local a, ukey = 7 + 5 * (i - 1), KEYS[5 + i]
  local state = redis.call('HGET', ukey, 'state')
  if state == 'queued' or state == 'sending' then
    redis.call('XADD', KEYS[4], '*', 'data', ARGV[a + 2], 'origin', ARGV[5], 'send_id', ARGV[a + 3])
    if state == 'queued' then redis.call('HSET', ukey, 'started_at', ARGV[6]) end
    local final = redis.call('HGET', ukey, 'replica_outcome') or 'sent'
    redis.call('HSET', ukey, 'state', final, 'sent_at', ARGV[6], 'chunks_sent', 1, 'chunks_total', 1)
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', 10000, '*', 'data', ARGV[a + 4])
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', 10000, '*', 'data', ARGV[a + 5])
    out[3 + i] = final
  else
    out[3 + i] = ''
  end
end
redis.call('HSET', KEYS[3], 'seq', ARGV[7 + 5 * (n - 1) + 1], 'chunk', 0)
return out
"""

# KEYS: utterance ; ARGV: now — queued (or a resumed sending) -> sending; 0 when cancelled meanwhile
_START = """
local s = redis.call('HGET', KEYS[1], 'state')
if s == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'sending', 'started_at', ARGV[1])
  return 1
end
if s == 'sending' then return 2 end
return 0
"""

# KEYS: utterance ; ARGV: now, messages — sending -> sent, or straight to the replica's outcome
# when its "stopped speaking" came first (a fast replica can finish before the sender records)
_MARK_SENT = """
local outcome = redis.call('HGET', KEYS[1], 'replica_outcome')
local state = outcome or 'sent'
redis.call('HSET', KEYS[1], 'state', state, 'sent_at', ARGV[1], 'chunks_sent', ARGV[2], 'chunks_total', ARGV[2])
return state
"""

# KEYS: utterance ; ARGV: outcome (spoken|interrupted), now, duration — the replica stopped
_MARK_SPOKEN = """
redis.call('HSET', KEYS[1], 'replica_outcome', ARGV[1], 'spoken_at', ARGV[2], 'duration', ARGV[3])
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'sent' then
  redis.call('HSET', KEYS[1], 'state', ARGV[1])
  return ARGV[1]
end
-- already spoken or interrupted (cut by the sender, or a repeated event): nothing changed, so
-- nothing may be counted again
if state == 'spoken' or state == 'interrupted' then return '' end
return state or ''
"""

# KEYS: utterance ; ARGV: now — an utterance sent whole but not yet heard to the end is cut by an
# interrupt: sent -> interrupted (1); any other state is left alone (0)
_CUT_PLAYING = """
if redis.call('HGET', KEYS[1], 'state') ~= 'sent' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'interrupted', 'replica_outcome', 'interrupted', 'finished_at', ARGV[1])
return 1
"""

# KEYS: lease, conversation ; ARGV: token, epoch-or-"", ttl ms
_RENEW = _LEASE_HELD + """
if lease_held(ARGV[1], ARGV[2], ARGV[3]) then return 1 end
return 0
"""

# KEYS: lease, conversation ; ARGV: token, ttl ms — the new epoch, or 0 when someone holds it
_TAKE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
return redis.call('HINCRBY', KEYS[2], 'lease_epoch', 1)
"""

# KEYS: lease, conversation ; ARGV: token
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('HINCRBY', KEYS[2], 'lease_epoch', 1)
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _arg(value: int | None) -> str:
    return "" if value is None else str(value)


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else str(max(1, int(seconds * 1000)))


def text(value: Any) -> str:
    """A Redis reply as ``str`` (this client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class RoomAppend:
    """A message for a room that is a Redis stream, written by the cursor move that records it:
    the encoded message, who sends it, and the send id that makes a retry append nothing."""

    stream: str
    data: bytes
    origin: str
    send_id: str


@dataclass(frozen=True)
class MoveCall:
    """The arguments of one :meth:`Store.move`."""

    conversation_id: str
    token: str
    seq: int
    chunk: int
    gen: int | None = None
    epoch: int | None = None
    ttl_s: float | None = None
    utterance_id: str | None = None
    chunks_sent: int | None = None
    append: RoomAppend | None = None
    refuse_above: int | None = None

    def keys(self) -> list[str]:
        cursor_key = keys.conv_cursor(self.conversation_id)
        return [keys.lease(self.conversation_id), keys.conversation(self.conversation_id), cursor_key,
                keys.utterance(self.utterance_id) if self.utterance_id else cursor_key,
                self.append.stream if self.append else cursor_key]

    def args(self, retried: bool = False) -> list[Any]:
        """The script's arguments; ``retried``: a call with this append's send id lost its reply,
        so the script looks in the room for it first."""
        count = self.chunks_sent if self.utterance_id else None
        a = self.append
        return [self.token, _arg(self.epoch), _ms(self.ttl_s), self.seq, self.chunk, _arg(self.gen),
                _arg(self.refuse_above), _arg(count), a.data if a else "", a.origin if a else "",
                a.send_id if a else "", "1" if retried else ""]


@dataclass(frozen=True)
class Moved:
    """A cursor move's answer: whether the lease was held, the interrupt generation, and whether
    the move (and its append) happened; not when an interrupt came first."""

    held: bool
    gen: int
    done: bool


@dataclass(frozen=True)
class TextSend:
    """One text utterance of :meth:`Store.send_texts`: its log position, record, room message and
    the two events (``utterance.sending``, ``utterance.sent``) its record gets."""

    seq: int
    utterance_id: str
    append: RoomAppend
    sending_event: dict[str, Any]
    sent_event: dict[str, Any]


@dataclass(frozen=True)
class TextsSent:
    """:meth:`Store.send_texts`'s answer: as :class:`Moved`, and each item's state after (None:
    passed over, cancelled or ended while it waited)."""

    held: bool
    gen: int
    done: bool
    states: list[str | None]


@dataclass(frozen=True)
class Cursor:
    seq: int
    chunk: int
    gen: int


class Store:
    """Conversation logs, cursors, utterance records and leases on one Redis client."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        #: the database number of the client (pub/sub channels are not per database)
        self.db = int(client.connection_pool.connection_kwargs.get("db") or 0)
        self._enqueue = client.register_script(_ENQUEUE)
        self._enqueue_many = client.register_script(_ENQUEUE_MANY)
        self._interrupt = client.register_script(_INTERRUPT)
        self._advance = client.register_script(_ADVANCE)
        #: send ids of room writes whose call lost its reply (see _unsure_while)
        self._unsure: set[str] = set()
        self._start = client.register_script(_START)
        self._renew = client.register_script(_RENEW)
        self._take = client.register_script(_TAKE)
        self._mark_sent = client.register_script(_MARK_SENT)
        self._mark_spoken = client.register_script(_MARK_SPOKEN)
        self._release = client.register_script(_RELEASE)
        self._cut_playing = client.register_script(_CUT_PLAYING)
        self._send_texts = client.register_script(_SEND_TEXTS)

    # conversations -------------------------------------------------------------------------

    def open_conversation(self, conversation_id: str, url: str, mode: str = "echo") -> dict[str, str]:
        key = keys.conversation(conversation_id)
        now = f"{time.time():.6f}"
        pipe = self.r.pipeline()
        pipe.hsetnx(key, "created_at", now)
        pipe.hset(key, mapping={"id": conversation_id, "url": url, "mode": mode, "state": "open", "opened_at": now})
        pipe.hdel(key, "closed_at")
        pipe.sadd(keys.CONVERSATIONS, conversation_id)
        pipe.execute()
        return self.conversation(conversation_id) or {}

    def close_conversation(self, conversation_id: str) -> bool:
        key = keys.conversation(conversation_id)
        if not self.r.exists(key):
            return False
        self.r.hset(key, mapping={"state": "closing"})
        self.add_event(conversation_id, {"type": "conversation.closing"})
        return True

    def mark_closed(self, conversation_id: str) -> None:
        pipe = self.r.pipeline()
        pipe.hset(keys.conversation(conversation_id), mapping={"state": "closed", "closed_at": f"{time.time():.6f}"})
        pipe.srem(keys.CONVERSATIONS, conversation_id)
        pipe.execute()
        self.add_event(conversation_id, {"type": "conversation.closed"})

    def conversation(self, conversation_id: str) -> dict[str, str] | None:
        raw = self.r.hgetall(keys.conversation(conversation_id))
        if not raw:
            return None
        return {text(k): text(v) for k, v in raw.items()}

    def open_conversations(self) -> list[str]:
        return sorted(text(m) for m in self.r.smembers(keys.CONVERSATIONS))

    def set_conversation_fields(self, conversation_id: str, **fields: Any) -> None:
        self.r.hset(keys.conversation(conversation_id), mapping={k: str(v) for k, v in fields.items()})

    # log -----------------------------------------------------------------------------------

    def enqueue(
        self,
        conversation_id: str,
        entry: dict[str, Any],
        record: dict[str, Any],
        blob: bytes | None = None,
        blob_ttl: int = 86400,
    ) -> tuple[int, bool]:
        """Append ``entry`` to the log. Returns ``(seq, created)``.

        Idempotent on the utterance id: enqueuing the same id again returns its seq and adds
        nothing. ``seq`` is -1 when the conversation is not open, -2 when the inference id is
        already taken by another utterance.
        """
        uid = entry["utterance_id"]
        inference_id = entry["inference_id"]
        keys_ = [keys.conversation(conversation_id), keys.conv_log(conversation_id), keys.utterance(uid),
                 keys.blob(uid), keys.inference(inference_id)]
        args = [json.dumps(entry), uid, "", blob_ttl, inference_id, f"{time.time():.6f}", json.dumps(record)]
        if not blob:
            res = self._enqueue(keys=keys_, args=args)
            return int(res[0]), bool(res[1])
        staged = f"{keys.blob(uid)}:staged:{uuid.uuid4().hex}"
        pipe = self.r.pipeline(transaction=False)
        pipe.set(staged, blob, ex=blob_ttl)
        self._enqueue(keys=[*keys_, staged], args=args, client=pipe)
        res = pipe.execute()[1]
        return int(res[0]), bool(res[1])

    def enqueue_many(self, conversation_id: str, items: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[tuple[int, bool]]:
        """Append text ``(entry, record)`` items in order, in one round trip, all or none: a
        ``(seq, created)`` per item as :meth:`enqueue` gives. ``[(-1, False)]`` when the
        conversation is not open; ``[(-2, False), (item, False)]`` when item ``item`` (from 0)
        has an inference id another utterance uses. Nothing is written then."""
        item_keys: list[str] = []
        args: list[Any] = [f"{time.time():.6f}"]
        for entry, record in items:
            item_keys += [keys.utterance(entry["utterance_id"]), keys.inference(entry["inference_id"])]
            args += [json.dumps(entry), entry["utterance_id"], entry["inference_id"], json.dumps(record)]
        res = self._enqueue_many(keys=[keys.conversation(conversation_id), keys.conv_log(conversation_id), *item_keys],
                                 args=args)
        if int(res[0]) == -1:
            return [(-1, False)]
        if int(res[0]) == -2:
            return [(-2, False), (int(res[1]) - 1, False)]
        return [(int(res[i]), bool(res[i + 1])) for i in range(1, len(res), 2)]

    def log_length(self, conversation_id: str) -> int:
        return int(self.r.llen(keys.conv_log(conversation_id)))

    def entries_after(self, conversation_id: str, seq: int, count: int = 64) -> list[dict[str, Any]]:
        raw = self.r.lrange(keys.conv_log(conversation_id), seq, seq + count - 1)
        return [json.loads(x) for x in raw]

    def backlog(self, conversation_id: str) -> int:
        return max(0, self.log_length(conversation_id) - self.cursor(conversation_id).seq)

    def supervision(self, conversation_ids: list[str]) -> list[tuple[int, str | None]]:
        """:meth:`backlog` and the record's ``state`` (None without a record) of each
        conversation, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for cid in conversation_ids:
            pipe.llen(keys.conv_log(cid))
            pipe.hget(keys.conv_cursor(cid), "seq")
            pipe.hget(keys.conversation(cid), "state")
        raw = pipe.execute()
        return [(max(0, int(length) - int(seq or 0)), text(state) if state is not None else None)
                for length, seq, state in zip(raw[0::3], raw[1::3], raw[2::3], strict=True)]

    # cursor --------------------------------------------------------------------------------

    def cursor(self, conversation_id: str) -> Cursor:
        raw: Any = self.r.hmget(keys.conv_cursor(conversation_id), ["seq", "chunk", "gen"])
        return Cursor(*(int(x) if x is not None else 0 for x in raw))

    def advance(self, conversation_id: str, token: str, seq: int, chunk: int, gen: int | None = None, *,
                epoch: int | None = None, ttl_s: float | None = None) -> int | None:
        """Move the cursor; the conversation's interrupt generation, or None when the lease is lost.

        With ``ttl_s`` the move also renews the lease (so a sender's fence moves with every
        message), and with ``epoch`` too it takes back a lease that ran out while nobody else
        took it (see ``_LEASE_HELD``).
        """
        moved = self.move(conversation_id, token, seq, chunk, gen, epoch=epoch, ttl_s=ttl_s)
        return moved.gen if moved.held else None

    def move(self, conversation_id: str, token: str, seq: int, chunk: int, gen: int | None = None, *,
             epoch: int | None = None, ttl_s: float | None = None, utterance_id: str | None = None,
             chunks_sent: int | None = None, append: RoomAppend | None = None,
             refuse_above: int | None = None) -> Moved:
        """:meth:`advance`, and in the same round trip: the record's ``chunks_sent`` of
        ``utterance_id``, and the message ``append`` into its room stream (once, even when the
        call is retried after a lost reply), unless an interrupt newer than ``refuse_above``
        came first."""
        call = MoveCall(conversation_id, token, seq, chunk, gen, epoch, ttl_s, utterance_id, chunks_sent, append,
                        refuse_above)
        with self._unsure_while([append]):
            held, current, done = self._advance(keys=call.keys(), args=call.args(self._retried(append)))
        return Moved(bool(held), int(current), bool(done))

    def _retried(self, append: RoomAppend | None) -> bool:
        return append is not None and append.send_id in self._unsure

    @contextlib.contextmanager
    def _unsure_while(self, appends: list[RoomAppend | None]) -> Iterator[None]:
        """Around a call that writes ``appends`` into their rooms: when Redis fails to answer it,
        their send ids are remembered (the call may have run), so their retry looks in the room
        first; once a call with them is answered, they are forgotten."""
        try:
            yield
        except redis.RedisError:
            self._unsure.update(a.send_id for a in appends if a is not None)
            raise
        for a in appends:
            if a is not None:
                self._unsure.discard(a.send_id)

    def move_many(self, calls: list[MoveCall]) -> list[Moved]:
        """Many :meth:`move` calls (of different conversations) in one round trip: the pacing
        loop's batch of chunks that are due at once. Each is atomic on its own; a retry after a
        lost reply writes no message twice (each append carries its send id)."""
        # EVALSHA by hand: a pipeline of Script calls asks SCRIPT EXISTS first, a round trip more
        answers: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(2):
            pipe = self.r.pipeline(transaction=False)
            for i in todo:
                call_keys = calls[i].keys()
                pipe.evalsha(self._advance.sha, len(call_keys), *call_keys, *calls[i].args(self._retried(calls[i].append)))
            with self._unsure_while([calls[i].append for i in todo]):
                replies = pipe.execute(raise_on_error=False)
            missing = []
            for i, reply in zip(todo, replies, strict=True):
                if isinstance(reply, redis.exceptions.NoScriptError):
                    missing.append(i)  # the script did not run: nothing happened for this one
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    answers[i] = reply
            if not missing:
                break
            self._advance.sha = self.r.script_load(_ADVANCE)  # a restarted Redis forgot the script
            todo = missing
        else:
            raise redis.exceptions.NoScriptError("the cursor script could not be loaded")
        return [Moved(bool(held), int(current), bool(done)) for held, current, done in answers]

    def send_texts(self, conversation_id: str, token: str, items: list[TextSend], *, refuse_above: int,
                   epoch: int | None = None, ttl_s: float) -> TextsSent:
        """Text utterances written into their room (a Redis stream) in one round trip, with
        everything that records them: see ``_SEND_TEXTS``. Nothing is written when the lease is
        lost or an interrupt newer than ``refuse_above`` came; a retry after a lost reply writes
        nothing twice."""
        if not items:
            raise ValueError("send_texts needs at least one item")
        now = time.time()
        item_keys = [keys.utterance(i.utterance_id) for i in items]
        args: list[Any] = [token, _arg(epoch), _ms(ttl_s), refuse_above, items[0].append.origin, f"{now:.6f}",
                           len(items)]
        for i in items:
            if i.append.stream != items[0].append.stream:
                raise ValueError("send_texts writes into one room")
            args += [i.seq, i.append.data, i.append.send_id, json.dumps({"ts": round(now, 6), **i.sending_event}),
                     json.dumps({"ts": round(now, 6), **i.sent_event})]
        args.append("1" if any(self._retried(i.append) for i in items) else "")
        with self._unsure_while([i.append for i in items]):
            reply = self._send_texts(keys=[keys.lease(conversation_id), keys.conversation(conversation_id),
                                           keys.conv_cursor(conversation_id), items[0].append.stream,
                                           keys.conv_events(conversation_id), *item_keys], args=args)
        states = [text(v) or None for v in reply[3:]]
        return TextsSent(bool(reply[0]), int(reply[1]), bool(reply[2]), states)

    def interrupt_state(self, conversation_id: str) -> tuple[int, int]:
        """``(generation, upto)``: how many interrupts, and the last seq the newest one covers."""
        reply: Any = self.r.hmget(keys.conversation(conversation_id), ["interrupt_gen", "interrupt_upto"])
        gen, upto = reply
        return int(gen or 0), int(upto or 0)

    def interrupt(self, conversation_id: str) -> tuple[int, int]:
        """Cancel every queued entry and ask the owner to stop; ``(generation, cancelled)``."""
        gen, cancelled = self._interrupt(
            keys=[
                keys.conversation(conversation_id),
                keys.conv_log(conversation_id),
                keys.conv_cursor(conversation_id),
                keys.conv_events(conversation_id),
            ],
            args=[f"{time.time():.6f}", keys.interrupts_channel(self.db), conversation_id],
        )
        return int(gen), int(cancelled)

    # utterances ----------------------------------------------------------------------------

    def utterance(self, utterance_id: str) -> dict[str, str] | None:
        raw = self.r.hgetall(keys.utterance(utterance_id))
        if not raw:
            return None
        return {text(k): text(v) for k, v in raw.items()}

    def utterance_states(self, utterance_ids: list[str]) -> list[str | None]:
        """The ``state`` of each record (None without one), in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for uid in utterance_ids:
            pipe.hget(keys.utterance(uid), "state")
        return [text(v) if v is not None else None for v in pipe.execute()]

    def start_utterance(self, utterance_id: str) -> int:
        """queued -> sending (1), already sending: a resume (2), or 0 when cancelled meanwhile."""
        return int(self._start(keys=[keys.utterance(utterance_id)], args=[f"{time.time():.6f}"]))

    def mark_sent(self, utterance_id: str, messages: int) -> str:
        """The last message is in the room: ``sent``, or the replica's outcome if it came first."""
        return text(self._mark_sent(keys=[keys.utterance(utterance_id)], args=[f"{time.time():.6f}", messages]))

    def mark_spoken(self, utterance_id: str, outcome: str, duration: Any) -> str:
        """The replica stopped speaking it; returns the state after (``spoken``/``interrupted`` once sent),
        or ``""`` when it already was spoken or interrupted (so the caller counts each outcome once)."""
        return text(self._mark_spoken(keys=[keys.utterance(utterance_id)],
                                      args=[outcome, f"{time.time():.6f}", "" if duration is None else duration]))

    def cut_playing(self, utterance_id: str) -> bool:
        """An interrupt came while the replica was still speaking this sent utterance:
        ``sent`` -> ``interrupted``. False when it was in any other state."""
        return bool(self._cut_playing(keys=[keys.utterance(utterance_id)], args=[f"{time.time():.6f}"]))

    def update_utterance(self, utterance_id: str, **fields: Any) -> None:
        self.r.hset(keys.utterance(utterance_id), mapping={k: str(v) for k, v in fields.items() if v is not None})

    def utterance_for_inference(self, inference_id: str) -> str | None:
        v = self.r.get(keys.inference(inference_id))
        return text(v) if v else None

    def blob(self, utterance_id: str) -> bytes | None:
        v: Any = self.r.get(keys.blob(utterance_id))
        return bytes(v) if v is not None else None

    def blob_start(self, utterance_id: str, length: int) -> tuple[int | None, bytes]:
        """The blob's length (None when missing) and its first ``length`` bytes (all of it if it
        is shorter), in one round trip and from the same moment (STRLEN of a missing key is 0; a
        blob is never stored empty)."""
        key = keys.blob(utterance_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.strlen(key)
        pipe.getrange(key, 0, length - 1)
        size, head = pipe.execute()
        return int(size) or None, bytes(head)

    def blob_range(self, utterance_id: str, start: int, end: int) -> bytes:
        """Bytes ``start`` up to (not including) ``end`` of the blob (GETRANGE): fewer at its
        end, none when it has gone."""
        if end <= start:
            return b""
        v: Any = self.r.getrange(keys.blob(utterance_id), start, end - 1)
        return bytes(v)

    def drop_blob(self, utterance_id: str) -> None:
        self.r.delete(keys.blob(utterance_id))

    # events --------------------------------------------------------------------------------

    def add_event(self, conversation_id: str, event: dict[str, Any]) -> None:
        event.setdefault("ts", round(time.time(), 6))
        self.r.xadd(keys.conv_events(conversation_id), {"data": json.dumps(event)}, maxlen=EVENTS_MAXLEN, approximate=True)

    def events(self, conversation_id: str, after: str = "0-0", count: int = 100, block_ms: int | None = None) -> list[tuple[str, dict[str, Any]]]:
        res: Any = self.r.xread({keys.conv_events(conversation_id): after}, count=count, block=block_ms)
        out: list[tuple[str, dict[str, Any]]] = []
        for _stream, entries in res or []:
            for eid, fields in entries:
                out.append((text(eid), json.loads(fields[b"data"])))
        return out

    # leases --------------------------------------------------------------------------------

    def take_lease(self, conversation_id: str, token: str, ttl_s: float) -> int:
        """Take a free lease: its epoch (1, 2, …), or 0 when someone holds it."""
        lease_keys = [keys.lease(conversation_id), keys.conversation(conversation_id)]
        return int(self._take(keys=lease_keys, args=[token, _ms(ttl_s)]))

    def renew_lease(self, conversation_id: str, token: str, ttl_s: float, epoch: int | None = None) -> bool:
        """Extend the lease ``token`` holds; with ``epoch``, take it back if it ran out untaken."""
        lease_keys = [keys.lease(conversation_id), keys.conversation(conversation_id)]
        return bool(self._renew(keys=lease_keys, args=[token, _arg(epoch), _ms(ttl_s)]))

    def renew_leases(self, leases: list[tuple[str, str, int | None]], ttl_s: float) -> list[bool]:
        """:meth:`renew_lease` for many ``(conversation, token, epoch)`` in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for cid, token, epoch in leases:
            self._renew(keys=[keys.lease(cid), keys.conversation(cid)], args=[token, _arg(epoch), _ms(ttl_s)], client=pipe)
        return [bool(held) for held in pipe.execute()]

    def release_lease(self, conversation_id: str, token: str) -> bool:
        lease_keys = [keys.lease(conversation_id), keys.conversation(conversation_id)]
        return bool(self._release(keys=lease_keys, args=[token]))

    def lease_owner(self, conversation_id: str) -> str | None:
        v = self.r.get(keys.lease(conversation_id))
        return text(v) if v else None
