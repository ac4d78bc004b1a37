"""Streaming utterances: audio that arrives in pieces, durable in Redis, forwarded as it comes.

A stream is a log entry of kind ``stream`` like any utterance (it waits its turn, and the ones
queued after it wait for it), whose audio is a Redis stream of pieces (:func:`keys.stream`):
an ``open`` marker, then one entry per piece (field ``d``), then an ``end`` entry — which may
carry the last piece, or say ``idle`` (abandoned) or ``cut`` (over a limit). The producer
appends (:class:`StreamStore`); the owner reads the pieces in order (:func:`chunks_of`) and
the sender sends each as soon as it arrives.

Where a resume starts: every piece is converted on its own and cut into chunks of at most the
chunk size (so a chunk never waits for the next piece), and conversion is deterministic, so the
pieces read again from the start give the same chunks in the same order. The cursor's chunk
index therefore names one position in the stream, and a new owner converts again, skips the
chunks already sent and continues with the next: at most the chunk in flight when the owner
died is sent twice.

An abandoned stream (no piece for ``stream_idle_s``, by Redis's own clock) is *finished* on the
wire, not interrupted: what it sent was real speech its producer meant, and the replica plays it
to the end and closes the turn; ``conversation.interrupt`` would cut audio the replica may still
be playing. Its record says ``stream_state: idle``. A stream over the size or length limits is
cut instead (``conversation.interrupt``, state ``failed``), as a whole utterance that fails
mid-way is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import redis

from . import chunks, keys
from .errors import AudioError, InvalidInput
from .live_audio import EncodedPieces, PcmPieces, Pieces
from .logs import step
from .sender import Interrupted, LeaseLost, Progress, Sender
from .store import text

log = logging.getLogger("echoq.streams")

RAW_FORMATS = ("raw", "pcm", "s16le")
#: how long one read of pieces blocks before the sender looks at interrupts, shutdown and idleness
POLL_MS = 100
#: the same while ffmpeg may still be decoding what came in (its output has no wake-up of its own)
DECODE_POLL_MS = 20

# KEYS: utterance, stream, conversation
# ARGV: piece, finish ('1' or ''), rate ('' or the piece's stated rate), byte limit, ttl, reason when over
# {1, pieces, bytes} | {-1} not a stream | {-2} finished | {-3} interrupted | {-4} failed
# | {-5, rate} another rate | {-6} over the limit: cut now | {-7} ended idle | {-8} cut before
_APPEND = """
local rec = redis.call('HMGET', KEYS[1], 'kind', 'state', 'stream_state', 'seq', 'source_rate', 'bytes_in')
if rec[1] ~= 'stream' then return {-1} end
if rec[3] == 'finished' then return {-2} end
if rec[3] == 'idle' then return {-7} end
if rec[3] == 'cut' then return {-8} end
if rec[2] == 'interrupted' or rec[2] == 'cancelled' then return {-3} end
if rec[2] == 'failed' then return {-4} end
local upto = tonumber(redis.call('HGET', KEYS[3], 'interrupt_upto') or '0')
if upto >= tonumber(rec[4]) then return {-3} end
if ARGV[3] ~= '' and ARGV[3] ~= rec[5] then return {-5, tonumber(rec[5])} end
local total = tonumber(rec[6] or '0') + string.len(ARGV[1])
if total > tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'stream_state', 'cut', 'error', ARGV[6])
  redis.call('XADD', KEYS[2], '*', 'end', '1', 'cut', ARGV[6])
  return {-6}
end
if ARGV[2] == '1' then
  redis.call('XADD', KEYS[2], '*', 'd', ARGV[1], 'end', '1')
  redis.call('HSET', KEYS[1], 'stream_state', 'finished')
else
  redis.call('XADD', KEYS[2], '*', 'd', ARGV[1])
end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
local pieces = redis.call('HINCRBY', KEYS[1], 'pieces_in', 1)
redis.call('HSET', KEYS[1], 'bytes_in', total)
return {1, pieces, total}
"""

# KEYS: utterance, stream ; ARGV: idle ms — ends an open stream whose newest entry (an entry id
# is Redis's own clock in ms) is older than that; 1 when it did
_END_IF_IDLE = """
if redis.call('HGET', KEYS[1], 'stream_state') ~= 'open' then return 0 end
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if newest[1] then
  local last = tonumber(string.match(newest[1][1], '^(%d+)'))
  if now - last < tonumber(ARGV[1]) then return 0 end
end
redis.call('HSET', KEYS[1], 'stream_state', 'idle')
redis.call('XADD', KEYS[2], '*', 'end', '1', 'idle', '1')
return 1
"""

_REFUSED = {
    -1: "no stream {uid!r}: open one first",
    -2: "stream {uid!r} is finished: it takes no more pieces",
    -3: "stream {uid!r} was interrupted: it takes no more pieces",
    -4: "stream {uid!r} failed: it takes no more pieces",
    -8: "stream {uid!r} was cut: it went over the limits",
    -7: "stream {uid!r} was ended after {idle:g} s without a piece: it takes no more pieces",
}


class StreamClosed(InvalidInput):
    """A piece for a stream that is unknown, finished, interrupted, failed, cut or ended idle."""


class StreamCut(AudioError):
    """The stream went over the size or length limits and was cut on the wire."""


class HandOver(LeaseLost):
    """The worker is stopping in the middle of a stream: leave it, the next owner continues it."""


@dataclass(frozen=True)
class Appended:
    """What one append did: how many pieces and bytes the stream holds now."""

    pieces: int
    bytes: int


class StreamStore:
    """The Redis side of streams: append pieces, end idle ones, read pieces in order."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._append = client.register_script(_APPEND)
        self._end_if_idle = client.register_script(_END_IF_IDLE)

    def open_marker(self, utterance_id: str, ttl_s: int) -> None:
        """Create the piece stream (its first entry starts the idle clock); before the log entry."""
        key = keys.stream(utterance_id)
        pipe = self.r.pipeline()
        pipe.xadd(key, {"open": "1"})
        pipe.expire(key, ttl_s)
        pipe.execute()

    def drop(self, utterance_id: str) -> None:
        self.r.delete(keys.stream(utterance_id))

    def append(self, conversation_id: str, utterance_id: str, piece: bytes, *, finish: bool, rate: int | None,
               byte_limit: int, over_limit: str, ttl_s: int, idle_s: float) -> Appended:
        """Append one piece (``finish``: the last one, maybe empty). :class:`StreamClosed` when the
        stream takes no more; :class:`StreamCut` when this piece takes it over ``byte_limit``."""
        res: Any = self._append(
            keys=[keys.utterance(utterance_id), keys.stream(utterance_id), keys.conversation(conversation_id)],
            args=[piece, "1" if finish else "", "" if rate is None else rate, byte_limit, ttl_s, over_limit])
        code = int(res[0])
        if code == 1:
            return Appended(int(res[1]), int(res[2]))
        if code == -5:
            raise InvalidInput(f"this piece is at {rate} Hz but stream {utterance_id!r} is at {int(res[1])} Hz: "
                               "every piece of a stream has the rate it was opened with")
        if code == -6:
            raise StreamCut(f"{over_limit}; stream {utterance_id!r} was cut")
        raise StreamClosed(_REFUSED[code].format(uid=utterance_id, idle=idle_s))

    def end_if_idle(self, utterance_id: str, idle_s: float) -> bool:
        return bool(self._end_if_idle(keys=[keys.utterance(utterance_id), keys.stream(utterance_id)],
                                      args=[int(idle_s * 1000)]))

    def read(self, utterance_id: str, after: str, block_ms: int) -> list[tuple[str, dict[bytes, bytes]]]:
        res: Any = self.r.xread({keys.stream(utterance_id): after}, count=256, block=block_ms)
        return [(text(eid), fields) for _key, entries in res or [] for eid, fields in entries]

    def exists(self, utterance_id: str) -> bool:
        return bool(self.r.exists(keys.stream(utterance_id)))


def converter_for(entry: dict[str, Any], block: int) -> Pieces:
    """The converter of a stream's log entry: raw PCM pieces, or encoded ones for ffmpeg."""
    rate = int(entry["sample_rate"])
    fmt = entry.get("format")
    if fmt is None or str(fmt).lower() in RAW_FORMATS:
        return PcmPieces(int(entry["source_rate"]), int(entry.get("channels") or 1), rate)
    return EncodedPieces(rate, block, None if fmt == "auto" else str(fmt))


def chunks_of(streams: StreamStore, entry: dict[str, Any], *, chunk_ms: int, end_ms: int, idle_s: float,
              max_seconds: float, check: Callable[[bool], None],
              on_piece: Callable[[int], None]) -> Generator[tuple[bytes, bool], None, None]:
    """Each chunk of a stream with its ``done`` flag, as the pieces arrive; see the module docstring.

    ``check(waited)`` runs before every read and raises to stop (a hand-over; an interrupt when
    ``waited``: the read before came back empty — while pieces flow, every cursor move already
    reports interrupts, so asking Redis again would only slow each piece down);
    ``on_piece(n)`` after the chunks of the n-th piece were taken.
    """
    uid = entry["utterance_id"]
    rate = int(entry["sample_rate"])
    size = chunks.chunk_bytes(rate, chunk_ms)
    conv = converter_for(entry, size)
    encoded = isinstance(conv, EncodedPieces)
    max_bytes = int(max_seconds * rate) * 2
    out_bytes = 0
    after, pieces = "0-0", 0
    last_seen = time.monotonic()
    waited = True

    def cut(pcm: bytes) -> list[bytes]:
        nonlocal out_bytes
        out_bytes += len(pcm)
        if out_bytes > max_bytes:
            raise StreamCut(f"the stream is longer than the limit of {max_seconds:g} s")
        return list(chunks.rechunk([pcm], size))

    try:
        while True:
            check(waited)
            batch = streams.read(uid, after, DECODE_POLL_MS if encoded else POLL_MS)
            waited = not batch
            if not batch:
                for pcm in cut(conv.ready()):
                    yield pcm, False
                if time.monotonic() - last_seen >= idle_s and streams.end_if_idle(uid, idle_s):
                    step(log, "stream.idle", logging.WARNING, utterance=uid, idle_s=idle_s)
                elif not streams.exists(uid):
                    raise AudioError("the stream's pieces have expired or are missing; open the stream again")
                continue
            last_seen = time.monotonic()
            for eid, fields in batch:
                after = eid
                if b"open" in fields:
                    continue
                if b"cut" in fields:
                    raise StreamCut(text(fields[b"cut"]))
                data = fields.get(b"d", b"")
                if b"end" not in fields:
                    for pcm in cut(conv.feed(data)):
                        yield pcm, False
                    pieces += 1
                    on_piece(pieces)
                    continue
                rest = cut(conv.feed(data) + conv.flush()) if data else cut(conv.flush())
                if not rest or b"idle" in fields:
                    # nothing left to carry done: close the turn with a short silence (as pipecat
                    # does), or an empty audio message when the setting says so
                    rest.append(b"\0" * (chunks.chunk_bytes(rate, end_ms) if end_ms else 0))
                for pcm in rest[:-1]:
                    yield pcm, False
                yield rest[-1], True
                if data:
                    on_piece(pieces + 1)
                return
    finally:
        conv.close()


def deliver(sender: Sender, entry: dict[str, Any], first_chunk: int, progress: Progress | None) -> int:
    """Send a stream through ``sender`` from chunk ``first_chunk``; returns how many chunks it had.

    Interrupts stop it between any two messages and while it waits for a piece. A failure (a cut,
    undecodable pieces) is raised as the :class:`AudioError` it is: the sender fails the
    utterance and, when its first message is in the room already, announces
    ``conversation.interrupt`` once, as for any utterance that fails part-way.
    """
    s = sender.settings
    uid, cid = entry["utterance_id"], sender.cid
    streams = StreamStore(sender.store.r)
    sent = [first_chunk]

    def check(waited: bool) -> None:
        if sender.stopping():
            raise HandOver(f"worker stopping in the middle of stream {uid}; the next owner continues it")
        if waited:
            sender._check_interrupt()

    def on_piece(n: int) -> None:
        sender.store.add_event(cid, {"type": "stream.piece", "utterance_id": uid, "piece": n, "chunks_sent": sent[0]})

    pieces = chunks_of(streams, entry, chunk_ms=s.chunk_ms, end_ms=s.stream_end_ms, idle_s=s.stream_idle_s,
                       max_seconds=s.max_audio_seconds, check=check, on_piece=on_piece)
    put = sender._audio_put(entry)

    def counted(pcm: bytes, last: bool) -> None:
        put(pcm, last)
        sent[0] += 1

    try:
        total = sender._deliver(entry, pieces, first_chunk, counted, progress, None, every=25, marked=True)
    except (Interrupted, LeaseLost):
        raise
    except AudioError as exc:
        if not isinstance(exc, StreamCut):
            sender.store.update_utterance(uid, stream_state="failed")
        raise
    finally:
        pieces.close()
    ended = (sender.store.utterance(uid) or {}).get("stream_state")
    sender.store.update_utterance(uid, stream_state=ended if ended == "idle" else "finished")
    streams.drop(uid)
    return total


Sender.deliverers["stream"] = deliver
