"""Streaming from the producer side: open a stream, write pieces as they are produced, finish.

:meth:`EchoqClient.stream` is the usual way in::

    with client.stream("c1", sample_rate=24000) as s:
        for pcm in tts.synthesize(text):    # raw s16le mono at 24 kHz
            s.write(pcm)

In asyncio code, ``async with client.stream(...) as s: await s.awrite(pcm)`` does the same
without blocking the event loop on Redis. Leaving the block finishes the stream (also when the block raises: the replica closes its turn
now instead of after the idle time). Pieces are raw s16le PCM at the stream's ``source_rate``
(whole frames each), or, with ``format`` set, encoded bytes ffmpeg decodes as they arrive
(``format="auto"`` lets ffmpeg tell; mp3, ogg, wav, flac, webm — not mp4/m4a, which need a
seekable file). :func:`pipe` streams a file object (stdin, a socket) as its bytes arrive, and
:func:`quickstart_piece` gives Tavus's quickstart body with ``done`` false its meaning.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any, Protocol

import redis

from worker import keys
from worker.errors import InvalidInput
from worker.settings import SAMPLE_RATES, Settings
from worker.store import Store
from worker.streams import RAW_FORMATS, Appended, StreamClosed, StreamCut, StreamStore

__all__ = ["Stream", "Appended", "StreamClosed", "StreamCut", "open_stream", "append", "pipe", "quickstart_piece",
           "is_stream"]

#: the largest piece one read of a pipe appends
PIPE_PIECE_BYTES = 64 * 1024


class Producer(Protocol):
    """What this module uses of :class:`producer.client.EchoqClient` (named, not imported: the
    client imports this module)."""

    settings: Settings
    redis: redis.Redis
    store: Store

    def _conversation(self, conversation_id: str, *, open_only: bool = True) -> dict[str, str]: ...

    def _enqueue(self, conversation_id: str, entry: dict[str, Any], record: dict[str, Any],
                 blob: bytes | None = None) -> str: ...

    def stream(self, conversation_id: str, *, sample_rate: int | None = None, source_rate: int | None = None,
               channels: int = 1, format: str | None = None, utterance_id: str | None = None,
               inference_id: str | None = None) -> Stream: ...


@dataclass(frozen=True)
class StreamInfo:
    """What an append needs to know about its stream."""

    conversation_id: str
    utterance_id: str
    raw: bool
    source_rate: int | None
    channels: int


def open_stream(client: Producer, conversation_id: str, *, sample_rate: int | None, source_rate: int | None,
                channels: int, format: str | None, utterance_id: str, inference_id: str) -> StreamInfo:
    """Open a stream in the conversation's log (it waits its turn like any utterance); the ids
    are already checked (:meth:`EchoqClient.stream` does that)."""
    rate = sample_rate or client.settings.default_sample_rate
    if rate not in SAMPLE_RATES:
        raise InvalidInput(f"sample_rate must be 16000 or 24000, not {rate}")
    raw = format is None or format.lower() in RAW_FORMATS
    if raw:
        source_rate = source_rate or rate
        if not 4000 <= source_rate <= 192000:
            raise InvalidInput(f"source_rate must be between 4000 and 192000 Hz, not {source_rate}")
        if not 1 <= channels <= 8:
            raise InvalidInput(f"channels must be 1 to 8, not {channels}")
    elif format is None or not format.isalnum():
        raise InvalidInput(f"format must be letters and digits (an ffmpeg format name), not {format!r}")
    uid, inf = utterance_id, inference_id
    if client._conversation(conversation_id).get("mode") == "microphone":
        raise InvalidInput(f"conversation {conversation_id!r} is in microphone mode: streams are echo-mode only")
    streams = StreamStore(client.redis)
    entry = {"utterance_id": uid, "kind": "stream", "inference_id": inf, "sample_rate": rate,
             "format": "raw" if raw else format, "source_rate": source_rate if raw else None, "channels": channels}
    record = {"kind": "stream", "sample_rate": rate, "format": entry["format"], "channels": channels,
              "stream_state": "open", "pieces_in": 0, "bytes_in": 0,
              **({"source_rate": source_rate} if raw else {})}
    existed = client.store.utterance(uid) is not None
    if not existed:
        streams.open_marker(uid, client.settings.blob_ttl_s)
    try:
        client._enqueue(conversation_id, entry, record)
    except BaseException:
        if not existed:
            streams.drop(uid)
        raise
    return StreamInfo(conversation_id, uid, raw, source_rate if raw else None, channels)


def info_of(client: Producer, utterance_id: str) -> StreamInfo:
    """The stream ``utterance_id`` as an append sees it; :class:`StreamClosed` when there is none."""
    rec = client.store.utterance(utterance_id)
    if rec is None:
        raise StreamClosed(f"no stream {utterance_id!r}: open one first")
    if rec.get("kind") != "stream":
        raise StreamClosed(f"utterance {utterance_id!r} is a whole {rec.get('kind')} utterance, not a stream")
    rate = rec.get("source_rate")
    return StreamInfo(rec["conversation_id"], utterance_id, rec.get("format") in RAW_FORMATS,
                      int(rate) if rate else None, int(rec.get("channels") or 1))


def append(client: Producer, info: StreamInfo, piece: bytes, *, finish: bool = False,
           rate: int | None = None) -> Appended:
    """Append one piece (``finish``: it is the last, and may be empty); see :class:`StreamStore`."""
    if not isinstance(piece, bytes | bytearray | memoryview):
        raise InvalidInput(f"a piece is bytes, not {type(piece).__name__}")
    piece = bytes(piece)
    if not piece and not finish:
        raise InvalidInput("a piece is empty: append audio, or finish the stream")
    s = client.settings
    if info.raw:
        frame = 2 * info.channels
        if len(piece) % frame:
            raise InvalidInput(f"a piece of {len(piece)} bytes is not whole s16le frames "
                               f"({frame} bytes each at {info.channels} channel(s)): an odd byte count splits a sample")
        assert info.source_rate is not None
        limit = min(s.max_audio_bytes, int(s.max_audio_seconds * info.source_rate) * frame)
        reason = (f"the stream is over the limit of {s.max_audio_seconds:g} s or {s.max_audio_bytes} bytes")
    else:
        if rate is not None:
            raise InvalidInput("encoded pieces carry their own rate: give a rate only for raw PCM")
        limit, reason = s.max_audio_bytes, f"the stream is over the limit of {s.max_audio_bytes} bytes"
    return StreamStore(client.redis).append(info.conversation_id, info.utterance_id, piece, finish=finish,
                                            rate=rate, byte_limit=limit, over_limit=reason,
                                            ttl_s=s.blob_ttl_s, idle_s=s.stream_idle_s)


class Stream:
    """A stream being written: :meth:`write` pieces, then :meth:`finish` (or leave the ``with``)."""

    def __init__(self, client: Producer, info: StreamInfo) -> None:
        self.client = client
        self.info = info
        self.utterance_id = info.utterance_id
        self.finished = False
        self.appended = Appended(0, 0)

    def write(self, piece: bytes, *, rate: int | None = None) -> Appended:
        """Append one piece; it is on its way to the room at once."""
        self.appended = append(self.client, self.info, piece, rate=rate)
        return self.appended

    def finish(self, piece: bytes = b"", *, rate: int | None = None) -> Appended:
        """End the stream, optionally with its last piece (whose last chunk then carries ``done``)."""
        self.appended = append(self.client, self.info, piece, finish=True, rate=rate)
        self.finished = True
        return self.appended

    async def awrite(self, piece: bytes, *, rate: int | None = None) -> Appended:
        """:meth:`write` for asyncio code: the Redis call runs in a thread, the event loop goes on."""
        return await asyncio.to_thread(self.write, piece, rate=rate)

    async def afinish(self, piece: bytes = b"", *, rate: int | None = None) -> Appended:
        """:meth:`finish` for asyncio code."""
        return await asyncio.to_thread(self.finish, piece, rate=rate)

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.to_thread(self.__exit__, exc_type, exc, tb)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.finished:
            return
        try:
            self.finish()
        except StreamClosed:
            if exc is None:  # interrupted or ended meanwhile: nothing left to finish
                return
        except Exception:
            if exc is None:
                raise


def pipe(client: Producer, conversation_id: str, source: IO[bytes], **options: object) -> str:
    """Stream everything ``source`` yields, as it arrives, then finish; returns the utterance id.

    Raw PCM is appended in whole frames (a read that ends inside a frame keeps the rest for the
    next piece)."""
    info = client.stream(conversation_id, **options).info  # type: ignore[arg-type]
    frame = 2 * info.channels if info.raw else 1
    held = b""
    fd = source.fileno() if hasattr(source, "fileno") else None
    while True:
        # os.read returns what the pipe has now, instead of waiting for a full buffer
        data = os.read(fd, PIPE_PIECE_BYTES) if fd is not None else source.read(PIPE_PIECE_BYTES)
        if not data:
            break
        held += data
        whole = len(held) - len(held) % frame
        if whole:
            append(client, info, held[:whole])
            held = held[whole:]
    if held:
        raise InvalidInput(f"the input ended inside a sample frame ({len(held)} byte(s) left over)")
    append(client, info, b"", finish=True)
    return info.utterance_id


def quickstart_piece(client: Producer, conversation_id: str, pcm: bytes, rate: int, inference_id: str,
                     done: bool) -> str:
    """One request of Tavus's quickstart in a series under ``inference_id``: the first opens a
    stream (raw PCM at ``rate``), each appends, the one with ``done`` true finishes it."""
    uid = client.store.utterance_for_inference(inference_id)
    if uid is None:
        try:
            info = client.stream(conversation_id, sample_rate=rate if rate in SAMPLE_RATES else 24000,
                                 source_rate=rate, inference_id=inference_id,
                                 utterance_id=_uid_for(inference_id)).info
        except InvalidInput as exc:
            if "already used" not in str(exc):
                raise
            uid = client.store.utterance_for_inference(inference_id)  # a concurrent first request won
            assert uid is not None
            info = info_of(client, uid)
    else:
        info = info_of(client, uid)
    if info.conversation_id != conversation_id:
        raise InvalidInput(f"inference_id {inference_id!r} belongs to conversation {info.conversation_id!r}")
    if pcm or done:
        append(client, info, pcm, finish=done, rate=rate)
    return info.utterance_id


def is_stream(client: Producer, inference_id: str | None) -> bool:
    """Whether ``inference_id`` names a stream (so a quickstart request with it belongs to that stream)."""
    uid = client.store.utterance_for_inference(inference_id) if inference_id else None
    return uid is not None and (client.store.utterance(uid) or {}).get("kind") == "stream"


def _uid_for(inference_id: str) -> str:
    """Utterance id of a quickstart stream: derived, so concurrent first requests agree on it."""
    return f"qs-{inference_id}" if keys.UTTERANCE_ID_RE.match(f"qs-{inference_id}") else inference_id
