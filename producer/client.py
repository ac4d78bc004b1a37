"""The Python producer client: the one path into echoq's queues.

Input is checked before anything is enqueued (unknown conversation, empty text, text that
cannot fit a message, audio that is clearly not audio, broken or over the limits by its header,
a bad sample rate) and raises a clear error; nothing is written then. Audio is not decoded
here: the worker decodes it, and audio that turns out unreadable there fails its utterance
(the record's error says why). Audio bytes travel as a Redis blob with a TTL; the Celery message that rings
the owner's doorbell carries ids only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from worker import audio, capacity, echo, keys, redisio, retention, sealing, wire_ids
from worker.errors import (
    AudioError,
    BackendUnavailable,
    EchoqError,
    InvalidInput,
    MessageTooLarge,
    TextTooLong,
    UnknownConversation,
)
from worker.logs import step
from worker.settings import SAMPLE_RATES, Settings, get_settings
from worker.store import DELIVERED_STATES, FINAL_STATES, Store, text
from worker.streams import Appended
from worker.text import check_text
from worker.transports import check_url
from worker.transports.urls import is_loopback, room_label, split_token, tavus_conversation_id

from . import fetch, streams
from .records import conversation_record, event_record, utterance_record
from .streams import Stream

log = logging.getLogger("echoq.producer")

RAW_FORMATS = ("raw", "pcm", "s16le")
SEALED_TOKEN_FIELD = sealing.TOKEN_FIELD
MODES = ("echo", "microphone")


def _utterance_id() -> str:
    return uuid.uuid4().hex


class EchoqClient:
    """Open conversations, say text, play audio, interrupt, close, and follow utterances."""

    def __init__(self, redis_url: str | None = None, *, settings: Settings | None = None,
                 redis_client: redis.Redis | None = None, celery_app: Celery | None = None) -> None:
        self.settings = settings or get_settings()
        self.redis = redis_client or redisio.connect(redis_url or self.settings.redis_url)
        self.store = Store(self.redis)
        self._app = celery_app

    @property
    def app(self) -> Celery:
        if self._app is None:
            from worker.celery_app import app

            self._app = app
        return self._app

    # conversations -------------------------------------------------------------------------

    def open(self, conversation_id: str, url: str, *, mode: str = "echo", tavus_conversation_id: str | None = None,
             meeting_token: str | None = None) -> dict[str, str]:
        """Open (or reopen) a conversation; a worker with room takes it and joins ``url``.

        On the wire the conversation is Tavus's: ``tavus_conversation_id``, or the last path
        segment of a Daily ``url`` (``https://tavus.daily.co/<id>``); a conflict between the two is
        :class:`InvalidInput`. Loopback rooms keep ``conversation_id``. ``meeting_token`` (or
        ``?t=`` in the URL) joins a private room; it is sealed with ``ECHOQ_SECRET_KEY`` before it
        is stored. Reopening an open conversation on another room is refused: close it first.

        When no live worker has room, the conversation is marked waiting and the returned
        record's ``waiting`` says why (a warning is logged too); it is taken as soon as a worker
        has room.
        """
        _check_id(conversation_id)
        check_url(url)
        if mode not in MODES:
            raise InvalidInput(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        room_url, url_token = split_token(url)
        token = meeting_token or url_token
        fields = {"wire_id": self._wire_id(conversation_id, room_url, tavus_conversation_id)}
        sealed = sealing.seal(token, self.settings.secret_key) if token else None
        with _backend():
            current = self.store.conversation(conversation_id)
            if current and current.get("state") in ("open", "closing") and current.get("url") != room_url:
                raise InvalidInput(
                    f"conversation {conversation_id!r} is {current.get('state')} on {room_label(current.get('url', ''))}; "
                    f"close it before opening it on {room_label(room_url)}")
            # set before the conversation opens, so a worker never adopts it with stale fields
            self.store.set_conversation_fields(conversation_id, **fields)
            wire_ids.point(self.redis, conversation_id, fields["wire_id"], (current or {}).get("wire_id"))
            if sealed is None:
                self.redis.hdel(keys.conversation(conversation_id), SEALED_TOKEN_FIELD)
            else:
                self.store.set_conversation_fields(conversation_id, **{SEALED_TOKEN_FIELD: sealed})
            record = self.store.open_conversation(conversation_id, room_url, mode)
            retention.keep_conversation(self.redis, conversation_id)  # a reopened one must not expire
            self.store.add_event(conversation_id, {"type": "conversation.opened", "mode": mode})
            self.app.send_task(keys.TASK_OPEN, args=[conversation_id], queue=keys.CONTROL_QUEUE)
            reason = capacity.fleet(self.redis, self.settings).waiting_reason
            if reason is not None and self.store.lease_owner(conversation_id) is None:
                capacity.Waiting(self.redis).mark(conversation_id, reason)
                record = {**record, "waiting": reason}
                step(log, "conversation.waiting", logging.WARNING, conversation=conversation_id, reason=reason)
        return _public(record)

    @staticmethod
    def _wire_id(conversation_id: str, url: str, tavus_id: str | None) -> str:
        if tavus_id is not None and not keys.CONVERSATION_ID_RE.match(tavus_id):
            raise InvalidInput(f"Tavus conversation id must be letters, digits, '.', '_' or '-', not {tavus_id!r}")
        if is_loopback(url):
            return tavus_id or conversation_id
        from_url = tavus_conversation_id(url)
        if tavus_id and from_url and tavus_id != from_url:
            raise InvalidInput(f"the Tavus conversation id {tavus_id!r} does not match the room URL, "
                               f"which names {from_url!r}")
        return tavus_id or from_url or conversation_id

    def by_wire_id(self, given: str) -> str:
        """The echoq conversation id for ``given``, which may be Tavus's conversation id (the wire
        id) of a conversation echoq knows by another id; ``given`` itself when it names an open
        conversation, or when nothing is known under it."""
        _check_id(given)
        with _backend():
            return wire_ids.resolve(self.redis, given)

    def close(self, conversation_id: str) -> None:
        """Stop taking utterances; the owner sends what is left, then leaves the room."""
        with _backend():
            self._conversation(conversation_id)
            self.store.close_conversation(conversation_id)
            if self.store.lease_owner(conversation_id) is None and self.store.backlog(conversation_id) == 0:
                self.store.mark_closed(conversation_id)
                retention.expire_conversation(self.redis, conversation_id, self.settings.retention_s)
            else:
                self.app.send_task(keys.TASK_CLOSE, args=[conversation_id], queue=keys.conv_queue(conversation_id))

    def conversation(self, conversation_id: str) -> dict[str, Any]:
        """State of a conversation: owner, backlog, current utterance, last error (typed: see
        :mod:`producer.records`)."""
        with _backend():
            conv = conversation_record(_public(self._conversation(conversation_id, open_only=False)))
            cur = self.store.cursor(conversation_id)
            conv["owner"] = (self.store.lease_owner(conversation_id) or "").split(":")[0] or None
            conv["backlog"] = self.store.backlog(conversation_id)
            conv["utterances"] = self.store.log_length(conversation_id)
            conv["cursor"] = {"seq": cur.seq, "chunk": cur.chunk}
            nxt = self.store.entries_after(conversation_id, cur.seq, count=1)
            current = self.store.utterance(nxt[0]["utterance_id"]) if nxt else None
            conv["current_utterance"] = current["id"] if current and current.get("state") == "sending" else None
            conv["waiting"] = self._waiting(conv)
        return conv

    def _waiting(self, conv: dict[str, Any]) -> str | None:
        """Why nobody sends for this conversation: no worker, or every worker full; else None."""
        if conv.get("owner") or conv.get("state") == "closed":
            return None
        # the heartbeats are the live truth; the recorded field only says since when it waits
        return capacity.fleet(self.redis, self.settings).waiting_reason

    # utterances ----------------------------------------------------------------------------

    def say(self, conversation_id: str, text: str, *, utterance_id: str | None = None,
            inference_id: str | None = None) -> str:
        """Queue a text echo; returns the utterance id."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput("text is empty")
        check_text(text)
        uid = utterance_id or _utterance_id()
        inf = inference_id or uid
        _check_utterance_ids(uid, inf)
        if self._conversation(conversation_id).get("mode") == "microphone":
            raise InvalidInput(
                f"conversation {conversation_id!r} is in microphone mode, which has no text-to-speech; "
                "send audio with play(), or open it in echo mode")
        # refuses text that cannot fit one message, before anything is written
        echo.text_echo(conversation_id, text, inf, max_bytes=self.settings.max_message_bytes)
        entry = {"utterance_id": uid, "kind": "text", "text": text, "inference_id": inf}
        return self._enqueue(conversation_id, entry, {"kind": "text", "chars": len(text)})

    def say_many(self, conversation_id: str, texts: Sequence[str], *, utterance_ids: Sequence[str] | None = None,
                 inference_ids: Sequence[str] | None = None) -> list[str]:
        """Queue text echoes in order with one Redis round trip and one doorbell; returns their
        utterance ids. Every item is checked as :meth:`say` checks it, and ids are idempotent as
        there; a bad item refuses the whole batch (:class:`InvalidInput` naming the item) and
        nothing is enqueued."""
        texts = list(texts)
        uids = list(utterance_ids) if utterance_ids is not None else [_utterance_id() for _ in texts]
        infs = list(inference_ids) if inference_ids is not None else [None] * len(texts)
        if len(uids) != len(texts) or len(infs) != len(texts):
            raise InvalidInput(f"{len(texts)} texts need as many utterance ids and inference ids, "
                               f"not {len(uids)} and {len(infs)}")
        if self._conversation(conversation_id).get("mode") == "microphone":
            raise InvalidInput(f"conversation {conversation_id!r} is in microphone mode, which has no text-to-speech")
        items = []
        seen: dict[str, int] = {}
        now = round(time.time(), 6)
        for i, (body, uid, inf_in) in enumerate(zip(texts, uids, infs, strict=True)):
            inf = inf_in or uid
            try:
                if not isinstance(body, str) or not body.strip():
                    raise InvalidInput("text is empty")
                check_text(body)
                _check_utterance_ids(uid, inf)
                for name, value in (("utterance id", uid), ("inference_id", inf)):
                    if (other := seen.setdefault(f"{name}:{value}", i)) != i:
                        raise InvalidInput(f"{name} {value!r} is item {other}'s too")
                echo.text_echo(conversation_id, body, inf, max_bytes=self.settings.max_message_bytes)
            except (InvalidInput, MessageTooLarge) as exc:
                raise type(exc)(f"item {i} of the batch: {exc}; nothing was enqueued") from exc
            entry = {"utterance_id": uid, "kind": "text", "text": body, "inference_id": inf, "enqueued_at": now}
            record = {"id": uid, "conversation_id": conversation_id, "inference_id": inf, "kind": "text",
                      "chars": len(body)}
            items.append((entry, record))
        if not items:
            return []
        with _backend():
            result = self.store.enqueue_many(conversation_id, items)
            if result[0][0] == -1:
                self._conversation(conversation_id)  # raises the precise reason
                raise UnknownConversation(f"conversation {conversation_id!r} is not open")
            if result[0][0] == -2:
                bad = result[1][0]
                raise InvalidInput(f"item {bad} of the batch: inference_id {items[bad][0]['inference_id']!r} is "
                                   "already used by another utterance; nothing was enqueued")
            self.app.send_task(keys.TASK_DRAIN, args=[conversation_id], queue=keys.conv_queue(conversation_id))
        step(log, "utterances.enqueued", conversation=conversation_id, count=len(items),
             seqs=f"{result[0][0]}-{result[-1][0]}", duplicates=sum(1 for _s, created in result if not created) or None)
        return uids

    def play(self, conversation_id: str, audio_in: str | os.PathLike[str] | bytes, *, sample_rate: int | None = None,
             source_rate: int | None = None, channels: int = 1, format: str | None = None,
             utterance_id: str | None = None, inference_id: str | None = None) -> str:
        """Queue an audio echo from a path, bytes, or an http(s) URL; returns the utterance id.

        ``sample_rate`` is the rate sent to the replica (16000 or 24000). Raw s16le PCM input
        (``format="raw"``) needs its ``source_rate``.

        The audio is checked by its header bytes (:func:`worker.audio.sniff`: size, container,
        duration where the header states it), never decoded here. Audio that passes but does not
        decode, is empty or decodes longer than the limit ends ``failed`` with the reason in the
        record's ``error`` (``conversation.interrupt`` follows when part of it was sent).
        """
        rate = sample_rate or self.settings.default_sample_rate
        if rate not in SAMPLE_RATES:
            raise InvalidInput(f"sample_rate must be 16000 or 24000, not {rate}")
        if format in RAW_FORMATS and not source_rate:
            raise InvalidInput("raw PCM needs its source_rate")
        uid = utterance_id or _utterance_id()
        inf = inference_id or uid
        _check_utterance_ids(uid, inf)
        conv = self._conversation(conversation_id)
        data = self._read_audio(audio_in)
        # header bytes only: what does not decode, or decodes longer than its header says, is
        # refused by the worker, which marks the utterance failed and says why
        head = audio.sniff(data, format=format, source_rate=source_rate, channels=channels,
                           max_bytes=self.settings.max_audio_bytes, max_seconds=self.settings.max_audio_seconds)
        from worker import chunks

        seconds = head.duration_s
        estimate = (math.ceil(seconds * rate * 2 / chunks.chunk_bytes(rate, self.settings.chunk_ms)) or 1
                    if seconds is not None else None)
        # header_s: what the header says the file holds, so the worker can note a decode that
        # stops well short of it (a truncated file)
        entry = {"utterance_id": uid, "kind": "audio", "inference_id": inf, "sample_rate": rate,
                 "format": format, "source_rate": source_rate, "channels": channels, "chunks_estimate": estimate,
                 "header_s": seconds if seconds is not None and not head.estimated else None}
        # The record's estimate counts what the sender counts in chunks_sent: echo chunks, or
        # microphone frames. chunks_total is set only once it is known (when the last one is sent).
        # duration_in is the header's until the worker has decoded the audio, then the decoded
        # length; duration_estimated says when it came from a bitrate rather than a sample count.
        record: dict[str, Any] = {"kind": "audio", "sample_rate": rate}
        if seconds is not None:
            shown = math.ceil(seconds * 1000 / self.settings.mic_frame_ms) or 1 if conv.get("mode") == "microphone" \
                else estimate
            record.update(duration_in=round(seconds, 3), chunks_estimate=shown,
                          duration_estimated=int(head.estimated))
        return self._enqueue(conversation_id, entry, record, blob=data)

    # streams -------------------------------------------------------------------------------

    def stream(self, conversation_id: str, *, sample_rate: int | None = None, source_rate: int | None = None,
               channels: int = 1, format: str | None = None, utterance_id: str | None = None,
               inference_id: str | None = None) -> Stream:
        """Open a stream: an utterance whose audio is written piece by piece as it is produced.

        Use it as ``with client.stream(cid, sample_rate=24000) as s: s.write(pcm)``; leaving the
        block finishes it. Pieces are raw s16le PCM at ``source_rate`` (default: ``sample_rate``),
        or encoded bytes with ``format`` (``"auto"`` lets ffmpeg tell). See :mod:`producer.streams`.
        """
        uid = utterance_id or _utterance_id()
        inf = inference_id or uid
        _check_utterance_ids(uid, inf)
        with _backend():
            return Stream(self, streams.open_stream(
                self, conversation_id, sample_rate=sample_rate, source_rate=source_rate, channels=channels,
                format=format, utterance_id=uid, inference_id=inf))

    def append(self, utterance_id: str, piece: bytes, *, rate: int | None = None) -> Appended:
        """Append a piece to the open stream ``utterance_id`` (``rate``: the piece's, checked)."""
        with _backend():
            return streams.append(self, streams.info_of(self, utterance_id), piece, rate=rate)

    def finish(self, utterance_id: str, piece: bytes = b"", *, rate: int | None = None) -> Appended:
        """Finish the stream ``utterance_id``, optionally with its last piece."""
        with _backend():
            return streams.append(self, streams.info_of(self, utterance_id), piece, finish=True, rate=rate)

    def interrupt(self, conversation_id: str) -> int:
        """Stop the utterance being sent, cancel the queued ones; returns how many were cancelled."""
        with _backend():
            self._conversation(conversation_id)
            _gen, cancelled = self.store.interrupt(conversation_id)
            self.app.send_task(keys.TASK_INTERRUPT, args=[conversation_id], queue=keys.conv_queue(conversation_id))
        return cancelled

    def status(self, utterance_id: str) -> dict[str, Any]:
        """The utterance record: state, counts, timings, error (typed: see :mod:`producer.records`)."""
        with _backend():
            rec = self.store.utterance(utterance_id)
        if rec is None:
            raise InvalidInput(f"no utterance {utterance_id!r}")
        return utterance_record(rec)

    def wait(self, utterance_id: str, *, timeout: float | None = None, states: tuple[str, ...] = DELIVERED_STATES,
             progress: Callable[[dict[str, Any]], None] | None = None, poll_s: float = 0.02) -> dict[str, Any]:
        """Block until the utterance reaches one of ``states``; ``TimeoutError`` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            rec = self.status(utterance_id)
            if progress is not None:
                progress(rec)
            if rec.get("state") in states:
                return rec
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"utterance {utterance_id} is still {rec.get('state')} after {timeout:.1f}s")
            time.sleep(poll_s)

    def events(self, conversation_id: str, after: str = "0-0", *, block_ms: int | None = None,
               count: int = 100) -> list[tuple[str, dict[str, Any]]]:
        """Delivery and replica events of a conversation after the event id ``after``, typed."""
        with _backend():
            batch = self.store.events(conversation_id, after, count=count, block_ms=block_ms)
        return [(event_id, event_record(event)) for event_id, event in batch]

    def health(self) -> dict[str, Any]:
        """Whether Redis answers, and the workers that reported in the last 30 seconds."""
        try:
            self.redis.ping()
            raw: Any = self.redis.hgetall(keys.WORKERS)
        except redis.RedisError as exc:
            return {"redis": False, "error": str(exc), "workers": []}
        now = time.time()
        workers = []
        for name, beat in raw.items():
            info = json.loads(beat)
            if now - info.get("ts", 0) < 30:
                workers.append({"name": text(name), "sessions": len(info.get("sessions", [])),
                                "max_sessions": info.get("max_sessions")})
        return {"redis": True, "workers": workers}

    # internals -----------------------------------------------------------------------------

    def _conversation(self, conversation_id: str, *, open_only: bool = True) -> dict[str, str]:
        _check_id(conversation_id)
        with _backend():
            conv = self.store.conversation(conversation_id)
        if conv is None:
            raise UnknownConversation(f"no conversation {conversation_id!r}; open it first")
        if open_only and conv.get("state") != "open":
            raise UnknownConversation(f"conversation {conversation_id!r} is {conv.get('state')}")
        return conv

    def _enqueue(self, conversation_id: str, entry: dict[str, Any], record: dict[str, Any],
                 blob: bytes | None = None) -> str:
        uid = entry["utterance_id"]
        entry["enqueued_at"] = round(time.time(), 6)
        record = {"id": uid, "conversation_id": conversation_id, "inference_id": entry["inference_id"], **record}
        with _backend():
            seq, created = self.store.enqueue(conversation_id, entry, record, blob, self.settings.blob_ttl_s)
            if seq == -1:
                self._conversation(conversation_id)  # raises the precise reason
                raise UnknownConversation(f"conversation {conversation_id!r} is not open")
            if seq == -2:
                raise InvalidInput(f"inference_id {entry['inference_id']!r} is already used by another utterance")
            self.app.send_task(keys.TASK_DRAIN, args=[conversation_id], queue=keys.conv_queue(conversation_id))
        step(log, "utterance.enqueued", conversation=conversation_id, utterance=uid, seq=seq, kind=entry["kind"],
             duplicate=True if not created else None)
        return uid

    def _read_audio(self, audio_in: str | os.PathLike[str] | bytes) -> bytes:
        limit = self.settings.max_audio_bytes
        if isinstance(audio_in, bytes | bytearray):
            data = bytes(audio_in)
        elif isinstance(audio_in, str) and audio_in.startswith(("http://", "https://")):
            data = self._fetch(audio_in, limit)
        else:
            path = Path(audio_in)
            if path.is_dir():
                raise AudioError(f"{path} is a directory, not an audio file")
            if not path.is_file():
                raise AudioError(f"no such audio file: {path}")
            if path.stat().st_size > limit:
                raise AudioError(f"audio file is {path.stat().st_size} bytes, over the limit of {limit}")
            data = path.read_bytes()
        if not data:
            raise AudioError("audio is empty (0 bytes)")
        if len(data) > limit:
            raise AudioError(f"audio is {len(data)} bytes, over the limit of {limit}")
        return data

    def _fetch(self, url: str, limit: int) -> bytes:
        return fetch.fetch(url, max_bytes=limit, deadline_s=self.settings.fetch_timeout_s,
                           allow=fetch.AllowList.parse(self.settings.fetch_allow_hosts))


def _public(record: dict[str, str]) -> dict[str, Any]:
    """A conversation record as shown to callers: the sealed token stays inside."""
    out: dict[str, Any] = dict(record)
    if out.pop(SEALED_TOKEN_FIELD, None):
        out["private"] = True
    return out


def _check_id(conversation_id: str) -> None:
    if not isinstance(conversation_id, str) or not keys.CONVERSATION_ID_RE.match(conversation_id):
        raise InvalidInput(f"conversation id must be 1-128 letters, digits, '.', '_' or '-', not {conversation_id!r}")


def _check_utterance_ids(uid: str, inference_id: str) -> None:
    for name, value in (("utterance id", uid), ("inference_id", inference_id)):
        if not keys.UTTERANCE_ID_RE.match(value):
            raise InvalidInput(f"{name} must be 1-200 letters, digits, '.', '_', ':' or '-', not {value!r}")


class _backend:
    """Maps Redis connection failures to :class:`BackendUnavailable` with a clear message."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            raise BackendUnavailable(f"Redis is unreachable: {exc}") from exc
        if exc is not None and not isinstance(exc, EchoqError | redis.RedisError):
            from kombu.exceptions import OperationalError

            if isinstance(exc, OperationalError):
                raise BackendUnavailable(f"the Celery broker is unreachable: {exc}") from exc


__all__ = ["EchoqClient", "FINAL_STATES", "DELIVERED_STATES", "TextTooLong"]
