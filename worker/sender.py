"""The ordered sender of one conversation: log entries after the cursor, one message at a time.

For each entry: claim it (queued -> sending), turn it into echo messages (text: one message;
audio: decode -> resample -> chunk, streamed, ``done`` on the last chunk; a stream: each piece as it
arrives, see :mod:`worker.streams`), send each and move the
cursor after each acknowledged send. Before every message it looks at the conversation's
interrupt generation, so an interrupt stops the utterance within one message.

Right before every send the session's :class:`~worker.fencing.Fence` must be open (no Redis
round trip); a closed fence is renewed once, and a lease that is gone stops the sender without
sending. Once a message is out, moving the cursor is retried for as long as Redis is away: the
position is kept in memory, the message is never sent again for it.

Transient send errors are retried here with bounded exponential backoff and jitter; a lost room
is rejoined and the message sent again. Permanent errors fail the utterance and the sender goes
on with the next one; if the utterance had started in the room, ``conversation.interrupt`` goes
out first, so the next utterance never interleaves with a half-sent one. A worker that is
stopping stops at a message boundary and leaves the rest of the utterance to the next owner.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, NamedTuple, TypeVar

import redis

from . import audio, chunks, echo, metrics
from .errors import (  # LeaseLost, Interrupted, Stopping: imported from here by the rest too
    Interrupted,
    JoinFailed,
    LeaseLost,
    MessageTooLarge,
    PermanentError,
    RetryableError,
    RoomDisconnected,
    Stopping,
)
from .fencing import Fence, until_redis_answers
from .logs import ms_since, step
from .pacing import AHEAD_CHUNKS, Handed, NeedsThread, PreparedChunk
from .readahead import ReadAhead
from .settings import Settings
from .store import MoveCall, Moved, RoomAppend, Store, TextSend, TextsSent
from .transports import Transport

log = logging.getLogger("echoq.sender")

Progress = Callable[[str, int, int | None], None]
T = TypeVar("T")


class SendExhausted(RetryableError):
    """A message could not be sent within the retry budget; the drain is tried again later."""


#: how often (in chunks) an audio utterance's record gets its chunks_sent count
_RECORD_EVERY = 25
#: at most this many text utterances go in one round trip (one Redis script; all or none)
_TEXT_BATCH = 16
#: an audio blob longer than this is read in parts: this much first, in the round trip that
#: finds its length, then ``BLOB_PART_BYTES`` at a time as the decoder takes them
BLOB_HEAD_BYTES = 256 * 1024
BLOB_PART_BYTES = 1024 * 1024
#: at most this many audio chunks go in one round trip in burst pacing; a retry after a lost reply
#: finds each in the room's newest 8 entries (``SENT_BEFORE``), so no more than 8
_CHUNK_BATCH = 8


class _Move(NamedTuple):
    """The cursor move that records the message about to be sent, and the record's count."""

    seq: int
    chunk: int
    utterance_id: str | None
    chunks_sent: int | None


#: real-time pacing catches up a stall this long (the chunks due meanwhile go at once, five 40 ms
#: chunks at most); a longer one starts the utterance's clock again
CATCH_UP_S = 0.2


class Pacer:
    """When the next message may go: every kind is capped in messages per second; audio chunks
    may also be held to real time."""

    def __init__(self, settings: Settings, conversation: str = "") -> None:
        self.conversation = conversation  # for the log
        self.realtime = settings.pacing == "realtime"
        self.min_gap = 1.0 / settings.max_messages_per_second if settings.max_messages_per_second else 0.0
        self._last = 0.0
        self._t0 = 0.0
        self._audio_s = 0.0
        self.late = 0  # times the real-time clock restarted because a chunk was too late to catch up

    def start_utterance(self) -> None:
        """A new utterance (or the rest of one, after a hand-over) starts its real-time clock now."""
        self._t0 = time.monotonic()
        self._audio_s = 0.0

    def message_due(self) -> float:
        """When the rate cap lets the next message of any kind go (monotonic)."""
        return self._last + self.min_gap

    def sent(self) -> None:
        self._last = time.monotonic()

    def audio_due(self, audio_seconds: float) -> float:
        """When the next chunk of ``audio_seconds`` may go; counts it as played from then on."""
        due = 0.0
        if self.realtime:
            now = time.monotonic()
            # stay about one chunk ahead of playback so the replica's buffer never runs dry
            due = self._t0 + self._audio_s - audio_seconds
            if now - due > max(audio_seconds, CATCH_UP_S):
                # too late to catch up (a long stall, a retry): the room has heard a gap, and
                # catching up would burst; the clock starts again here instead. A shorter stall
                # is caught up: the chunks due meanwhile go at once (a few), and the schedule
                # holds, so the replica is back one chunk ahead and later chunks are not late.
                step(log, "pacing.clock_restarted", logging.WARNING, conversation=self.conversation,
                     late_ms=round((now - due) * 1000, 1))
                self._t0, due = now - self._audio_s + audio_seconds, now
                self.late += 1
        self._audio_s += audio_seconds
        return due


class Sender:
    """Sends one conversation's log into its room. Used by one thread at a time."""

    #: how entries of other kinds are sent, ``kind -> deliver(sender, entry, first_chunk, progress)``
    #: returning the messages sent: :mod:`worker.streams` adds ``stream`` (it builds on this
    #: module, so this one does not import it; the session manager imports it)
    deliverers: ClassVar[dict[str, Callable[[Sender, dict[str, Any], int, Progress | None], int]]] = {}

    def __init__(
        self,
        conversation_id: str,
        *,
        store: Store,
        transport: Transport,
        settings: Settings,
        token: str,
        wake: threading.Event,
        stopping: Callable[[], bool],
        epoch: int | None = None,
        wire_id: str | None = None,
    ) -> None:
        self.cid = conversation_id
        # The conversation's id on the wire: Tavus's, which echoq's own id need not be.
        self.wire_id = wire_id or conversation_id
        self.store = store
        self.transport = transport
        self.settings = settings
        self.token = token
        self.epoch = epoch
        self.fence = Fence(settings.lease_ttl_s, settings.lease_margin_s)
        self.wake = wake
        self.stopping = stopping
        self.pacer = Pacer(settings, conversation_id)
        self.chunk_ms = settings.chunk_ms
        self.gen = store.cursor(conversation_id).gen
        # A room that is a stream in the store's Redis is written by the cursor move itself: one
        # round trip per message, and the lease and interrupt checks are atomic with the write.
        client = getattr(store, "r", None)  # a store kept elsewhere than Redis never folds
        self.folds = client is not None and transport.room_in(client)
        self._next_move: _Move | None = None
        #: hands an audio utterance to the process's pacing loop (real-time pacing), which calls
        #: :meth:`send_paced_chunk` when each chunk is due; None: this thread paces (see
        #: :mod:`worker.pacing`)
        self.handoff: Callable[[Sender, dict[str, Any], int], None] | None = None
        #: set while the pacing loop sends: a step that would wait raises NeedsThread instead
        self.no_wait = False
        self._prefetched: ReadAhead | None = None  # its audio, decoding while this one plays
        self._prefetch_lock = threading.Lock()
        self._took_over = False  # the first drain looks for what the owner before left unrecorded
        self._on_thread: str | None = None  # an utterance the loop gave back: this thread sends it

    # the loop ------------------------------------------------------------------------------

    def drain(self, progress: Progress | None = None) -> int:
        """Send every entry after the cursor; returns how many entries were handled. Raises
        :class:`~worker.pacing.Handed` when an utterance went to the pacing loop."""
        try:
            handled = self._drain(progress)
        except Handed:  # the loop has the utterance, and the next one's decoder is started for it
            raise
        except BaseException:
            self.drop_prefetched()
            raise
        self.drop_prefetched()
        return handled

    def _drain(self, progress: Progress | None) -> int:
        handled = 0
        if not self._took_over:
            self._took_over = True
            self._record_orphan()
        while not self.stopping():
            cur = self.store.cursor(self.cid)
            gen, upto = self.store.interrupt_state(self.cid)
            if gen > cur.gen:
                self._finish_interrupt(gen, upto, cur.seq)
                continue
            entries = self.store.entries_after(self.cid, cur.seq, count=32)
            if not entries:
                return handled
            i = 0
            while i < len(entries):
                entry = entries[i]
                if self.stopping():
                    return handled
                first_chunk = cur.chunk if entry["seq"] == cur.seq + 1 else 0
                try:
                    done = self._send_texts(self._text_run(entries, i))
                    if not done:
                        self._send_entry(entry, first_chunk, progress)
                        done = 1
                except Interrupted:
                    break
                except Stopping:
                    step(log, "sender.stopped", conversation=self.cid, seq=entry["seq"])
                    return handled
                handled += done
                i += done
        return handled

    def _record_orphan(self) -> None:
        """A new owner's first look: the entry the cursor has just passed had its last message in
        the room, but the owner before died before recording it (the message and the cursor move
        are one round trip, the record the next): record it sent now, or it says ``sending``
        forever. Its ``chunks_sent`` is exact, since the last piece's move writes it."""
        cur = self.store.cursor(self.cid)
        if cur.chunk or cur.seq <= 0:  # mid-entry: the entry resumes and records itself
            return
        for entry in self.store.entries_after(self.cid, cur.seq - 1, count=1):
            rec = self.store.utterance(entry["utterance_id"]) or {}
            if entry["seq"] == cur.seq and rec.get("state") == "sending":
                sent = 1 if entry["kind"] == "text" else int(rec.get("chunks_sent") or 0)
                step(log, "utterance.recovered", conversation=self.cid, utterance=entry["utterance_id"],
                     seq=cur.seq, messages=sent)
                self.finish_sent(entry, sent, time.monotonic())

    def _finish_interrupt(self, gen: int, upto: int, done_seq: int) -> None:
        """Send ``conversation.interrupt`` and move the cursor past everything it covers."""
        t0 = time.monotonic()
        # the room first (what the interrupt is for); the records after it, before the cursor
        # moves: an owner dying in between leaves the interrupt to send again, never a record
        self._announce_interrupt()
        # an utterance cut mid-way (here, or by a worker that died) is interrupted, not pending
        for entry in self.store.entries_after(self.cid, done_seq, count=1):
            if entry["seq"] <= upto:
                rec = self.store.utterance(entry["utterance_id"]) or {}
                if rec.get("state") == "sending":
                    self._mark_interrupted(entry)
        self._cut_playing(done_seq)
        self._advance(max(done_seq, upto), 0, gen)
        self.gen = gen
        self.store.add_event(self.cid, {"type": "interrupt.sent", "upto": upto})
        step(log, "interrupt.sent", conversation=self.cid, upto=upto, ms=ms_since(t0))

    def _cut_playing(self, done_seq: int, lookback: int = 32) -> None:
        """Utterances sent whole but not yet heard to the end (``sent``: no replica outcome yet)
        are cut by the interrupt too: they end ``interrupted``. Newest first, back to the first
        one the replica finished (those that never reached the room, or ended interrupted
        already, are passed over)."""
        first = max(0, done_seq - lookback)
        entries = list(reversed(self.store.entries_after(self.cid, first, count=done_seq - first)))
        # their states in one round trip: behind an interrupt there are often many cancelled ones
        states = self.store.utterance_states([e["utterance_id"] for e in entries])
        for entry, state in zip(entries, states, strict=True):
            # passed over: never played, or ended already (the replica may have answered the
            # interrupt, which goes out before this, for the one it was speaking)
            if state in ("failed", "cancelled", "interrupted"):
                continue
            if state != "sent" or not self.store.cut_playing(entry["utterance_id"]):
                return  # the replica finished it (or is just finishing it): nothing before it plays
            self.store.add_event(self.cid, {"type": "utterance.interrupted", "utterance_id": entry["utterance_id"],
                                            "seq": entry["seq"], "playing": True})
            metrics.utterance_finished("interrupted")
            step(log, "utterance.interrupted", conversation=self.cid, utterance=entry["utterance_id"],
                 seq=entry["seq"], playing=True)

    def _announce_interrupt(self) -> None:
        """Tell the room the current utterance was cut: send ``conversation.interrupt``."""
        self._send(echo.interrupt(self.wire_id), kind="interrupt")

    def _mark_interrupted(self, entry: dict[str, Any]) -> None:
        uid, seq = entry["utterance_id"], entry["seq"]

        def record() -> None:
            self.store.update_utterance(uid, state="interrupted", finished_at=f"{time.time():.6f}")
            self.store.add_event(self.cid, {"type": "utterance.interrupted", "utterance_id": uid, "seq": seq})

        self._record(record, "interrupted utterance")
        metrics.utterance_finished("interrupted")
        step(log, "utterance.interrupted", conversation=self.cid, utterance=uid, seq=seq)

    # one entry -----------------------------------------------------------------------------

    def _send_entry(self, entry: dict[str, Any], first_chunk: int, progress: Progress | None) -> None:
        uid = entry["utterance_id"]
        seq = int(entry["seq"])
        claim = self.store.start_utterance(uid)
        if claim == 0:  # cancelled (or already final) while it waited: skip it
            self._advance(seq, 0)
            return
        t0 = time.monotonic()
        step(log, "utterance.started", conversation=self.cid, utterance=uid, seq=seq, kind=entry["kind"],
             resume_chunk=first_chunk or None)
        self.store.add_event(self.cid, {"type": "utterance.sending", "utterance_id": uid, "seq": seq})
        try:
            if entry["kind"] == "text":
                sent = self._send_text(entry)
            elif entry["kind"] in self.deliverers:
                sent = self.deliverers[entry["kind"]](self, entry, first_chunk, progress)
            elif self.handoff is not None and self._on_thread != uid:
                self.handoff(self, entry, first_chunk)  # raises Handed: the loop sends it
                raise AssertionError("the pacing loop did not take the utterance")
            else:
                sent = self._send_audio(entry, first_chunk, progress)
        except Interrupted:
            self._mark_interrupted(entry)
            raise
        except PermanentError as exc:
            self._fail(entry, exc, cut=bool(entry.get("_first_sent")) or first_chunk > 0)
            return
        self._on_thread = None
        self.finish_sent(entry, sent, t0)

    def resume_on_thread(self, entry: dict[str, Any]) -> None:
        """The pacing loop gave ``entry`` back (a send to retry, a room to rejoin): the next drain
        sends the rest of it itself, with the back-offs the loop does not wait for."""
        self._on_thread = entry["utterance_id"]

    def finish_sent(self, entry: dict[str, Any], sent: int, t0: float, *, paced: str | None = None) -> None:
        """Record an utterance whose last message is in the room (``t0``: when it started;
        ``paced``: ``"loop"`` when the pacing loop sent it)."""
        uid, seq = entry["utterance_id"], int(entry["seq"])

        def record() -> str:
            state = self.store.mark_sent(uid, sent)
            self.store.add_event(self.cid, {"type": "utterance.sent", "utterance_id": uid, "seq": seq, "messages": sent})
            self.store.drop_blob(uid)
            return state

        state = self._record(record, "sent utterance")
        metrics.utterance_finished(state)
        step(log, "utterance.sent", conversation=self.cid, utterance=uid, seq=seq, messages=sent, ms=ms_since(t0),
             paced=paced)

    def fail(self, entry: dict[str, Any], exc: PermanentError, *, cut: bool) -> None:
        """Fail one utterance (see :meth:`_fail`); for the pacing loop's executor."""
        self._fail(entry, exc, cut=cut)

    def mark_interrupted(self, entry: dict[str, Any]) -> None:
        """Record an utterance cut by an interrupt; for the pacing loop's executor."""
        self._mark_interrupted(entry)

    def check_interrupt(self) -> None:
        """Raise :class:`Interrupted` if an interrupt came since this sender last looked."""
        self._check_interrupt()

    def _fail(self, entry: dict[str, Any], exc: PermanentError, *, cut: bool) -> None:
        """Fail one utterance and go on. ``cut``: part of it is in the room already, so the room
        hears ``conversation.interrupt`` before anything else (no ``done`` will ever come)."""
        uid, seq = entry["utterance_id"], int(entry["seq"])
        error = str(exc)
        if cut:
            self._announce_interrupt()
            error = f"{error} (cut mid-utterance: conversation.interrupt sent)"

        def record() -> None:
            self.store.update_utterance(uid, state="failed", error=error, finished_at=f"{time.time():.6f}")
            self.store.add_event(self.cid, {"type": "utterance.failed", "utterance_id": uid, "seq": seq, "error": error,
                                            "interrupt_sent": cut})

        # recorded before the cursor passes it: an owner dying in between leaves a final record
        # that the next owner skips, never a "sending" one behind the cursor
        self._record(record, "failed utterance")
        self._advance(seq, 0)
        metrics.utterance_finished("failed")
        step(log, "utterance.failed", logging.WARNING, conversation=self.cid, utterance=uid, seq=seq, reason=str(exc),
             interrupt_sent=cut)

    def _send_text(self, entry: dict[str, Any]) -> int:
        message = echo.text_echo(self.wire_id, entry["text"], entry["inference_id"], max_bytes=self.settings.max_message_bytes)
        if not self.folds:  # a folded send is refused by Redis itself when an interrupt came
            self._check_interrupt()
        self._send_moving(lambda: self._send(message, kind="text", entry=entry), _Move(int(entry["seq"]), 0, None, None))
        return 1

    def _text_run(self, entries: list[dict[str, Any]], start: int) -> list[dict[str, Any]]:
        """The text entries from ``start`` on that may go in one round trip: in a room that folds,
        with no rate cap to space them, none of them given back by the pacing loop."""
        if not self.folds or self.pacer.min_gap:
            return []
        run = []
        for entry in entries[start:start + _TEXT_BATCH]:
            if entry["kind"] != "text" or entry["utterance_id"] == self._on_thread:
                break
            run.append(entry)
        return run

    def _send_texts(self, run: list[dict[str, Any]]) -> int:
        """Send a run of text utterances into a room that folds, in one round trip with their
        claims, records, events and the cursor move (:meth:`Store.send_texts`); returns how many
        of ``run`` were handled, from its start. 0: the first one goes the one-at-a-time way (it
        is too long, or the room refuses it now: that way fails it or retries it)."""
        messages = []
        for entry in run:
            try:
                messages.append(echo.text_echo(self.wire_id, entry["text"], entry["inference_id"],
                                               max_bytes=self.settings.max_message_bytes))
            except PermanentError:
                break
        if not messages or not self.transport.connected:
            return 0
        self._fenced()
        items = []
        for entry, message in zip(run, messages, strict=False):
            try:
                append = self.transport.prepare_append(message)
            except (MessageTooLarge, RetryableError):
                break
            uid, seq = entry["utterance_id"], int(entry["seq"])
            items.append(TextSend(seq, uid, append, {"type": "utterance.sending", "utterance_id": uid, "seq": seq},
                                  {"type": "utterance.sent", "utterance_id": uid, "seq": seq, "messages": 1}))
        if not items:
            return 0
        t0 = time.monotonic()

        def send() -> TextsSent:
            requested = time.monotonic()
            answer = self.store.send_texts(self.cid, self.token, items, refuse_above=self.gen, epoch=self.epoch,
                                           ttl_s=self.settings.lease_ttl_s)
            if answer.held:
                self.fence.renewed(requested)
            return answer

        answer = self._record(send, "text utterances")
        if not answer.held:
            raise self._fenced_out()
        if not answer.done:  # nothing was written; the drain sends conversation.interrupt first
            raise Interrupted()
        self.pacer.sent()
        elapsed = time.monotonic() - t0
        for item, entry, state in zip(items, run, answer.states, strict=False):
            if state is None:  # cancelled while it waited: passed over, as a failed claim is
                continue
            metrics.message_sent("text", elapsed)
            self._note_first(entry)
            metrics.utterance_finished(state)
            step(log, "utterance.started", conversation=self.cid, utterance=item.utterance_id, seq=item.seq,
                 kind="text")
            step(log, "utterance.sent", conversation=self.cid, utterance=item.utterance_id, seq=item.seq, messages=1,
                 ms=ms_since(t0), batch=len(items))
        return len(items)

    def _pcm_chunks(self, entry: dict[str, Any]) -> Iterator[bytes]:
        data = self._blob(entry["utterance_id"])
        if data is None:
            raise PermanentError("the audio blob has expired or is missing; enqueue the audio again")
        rate = int(entry["sample_rate"])
        pcm = audio.pcm_stream(
            data,
            target_rate=rate,
            format=entry.get("format"),
            source_rate=entry.get("source_rate"),
            channels=int(entry.get("channels") or 1),
            max_bytes=self.settings.max_audio_bytes,
            max_seconds=self.settings.max_audio_seconds,
            expected_s=entry.get("header_s"),
            on_end=functools.partial(self._decoded, entry["utterance_id"]),
        )
        return chunks.rechunk(pcm, chunks.chunk_bytes(rate, self.chunk_ms))

    def _blob(self, uid: str) -> bytes | audio.Arriving | None:
        """The audio blob of ``uid``: its bytes when it is small; else its first part, and the
        rest read a part at a time as the decoder takes them (a GET of megabytes would hold the
        first chunk back until the last byte is in). None when it has expired or is missing."""
        size, head = self.store.blob_start(uid, BLOB_HEAD_BYTES)
        if size is None:
            return None
        if size <= len(head):
            return head
        return audio.Arriving(head, size, self._blob_parts(uid, len(head), size))

    def _blob_parts(self, uid: str, start: int, size: int) -> Iterator[bytes]:
        """The blob's bytes from ``start`` on, a part at a time; stops when it has gone (the
        decoder then fails the utterance, saying how much of it came). A Redis error comes out of
        the decode as a failed ``store.blob`` would: the drain is tried again."""
        while start < size:
            part = self.store.blob_range(uid, start, min(start + BLOB_PART_BYTES, size))
            if not part:
                return
            yield part
            start += len(part)

    def _decoded(self, uid: str, decoded: audio.Decoded) -> None:
        """The decoded length (and why decoding stopped early) goes on the record, for people:
        best effort, it never fails a send."""
        fields = {"duration_in": round(decoded.duration_s, 3), "duration_estimated": 0, "decode_note": decoded.note}
        try:
            self.store.update_utterance(uid, **fields)
        except redis.RedisError as exc:
            log.debug("decoded length of %s not recorded: %s", uid, exc)

    def _audio_put(self, entry: dict[str, Any]) -> Callable[[bytes, bool], None]:
        """Sends one audio chunk of ``entry`` as an echo message, paced; starts the utterance's pacing."""
        rate = int(entry["sample_rate"])
        self.pacer.start_utterance()

        def put(pcm: bytes, last: bool) -> None:
            message = self._audio_message(entry, pcm, last)
            self._wait_until(self.pacer.audio_due(len(pcm) / (2 * rate)))
            self._send(message, kind="audio", entry=entry)

        return put

    # the pacing loop's side ------------------------------------------------------------------

    def take_reader(self, entry: dict[str, Any]) -> ReadAhead:
        """The audio of ``entry``, decoding ahead on a thread: the one started while the entry
        before it played, if any. Once it is decoded, the next entry's decoder starts."""
        uid = entry["utterance_id"]
        with self._prefetch_lock:
            reader, self._prefetched = self._prefetched, None
        if reader is not None and reader.utterance_id != uid:
            reader.close()
            reader = None
        if reader is None:
            reader = self._read_ahead(entry)
        return reader

    def _read_ahead(self, entry: dict[str, Any]) -> ReadAhead:
        # once this one is decoded (its last chunks wait to be sent), the next one starts
        return ReadAhead(entry["utterance_id"], lambda: chunks.mark_last(self._pcm_chunks(entry)), AHEAD_CHUNKS,
                         on_end=lambda: self._prefetch_after(int(entry["seq"])))

    def _prefetch(self, entry: dict[str, Any]) -> None:
        with self._prefetch_lock:
            if self._prefetched is not None or self.stopping():  # a sender let go drops, not starts
                return
            self._prefetched = self._read_ahead(entry)
        step(log, "utterance.decoding_ahead", conversation=self.cid, utterance=entry["utterance_id"],
             seq=entry["seq"])

    def _prefetch_after(self, seq: int) -> None:
        """Start decoding the entry after ``seq`` if it is audio (an entry queued after the
        drain looked: it would otherwise start only when this one has been sent)."""
        if self._prefetched is not None or self.stopping():
            return
        try:
            following = self.store.entries_after(self.cid, seq, count=1)
        except redis.RedisError:  # only a head start: the drain decodes it anyway
            return
        if following and following[0].get("kind") == "audio":
            self._prefetch(following[0])

    def drop_prefetched(self) -> None:
        """Stop decoding the next entry ahead (it will not be sent by this sender as it is)."""
        with self._prefetch_lock:
            reader, self._prefetched = self._prefetched, None
        if reader is not None:
            reader.close()

    def _audio_message(self, entry: dict[str, Any], pcm: bytes, last: bool) -> dict[str, Any]:
        return echo.audio_echo(self.wire_id, pcm, int(entry["sample_rate"]), entry["inference_id"], last,
                               max_bytes=self.settings.max_message_bytes)

    @staticmethod
    def _piece_move(entry: dict[str, Any], index: int, last: bool, every: int) -> _Move:
        """The cursor move that records piece ``index`` of ``entry`` as in the room, with the
        record's count (for people; the cursor is the truth) every ``every`` pieces."""
        uid, seq = entry["utterance_id"], int(entry["seq"])
        count = index + 1 if index % every == 0 or last else None  # the last: exact once the cursor is past
        return _Move(seq, 0, uid, count) if last else _Move(seq - 1, index + 1, uid, count)

    def send_paced_chunk(self, entry: dict[str, Any], index: int, pcm: bytes, last: bool) -> None:
        """Send chunk ``index`` of an audio utterance now, for the pacing loop (a room that does
        not fold): the steps of :meth:`_deliver` for one piece, with every wait replaced by
        :class:`NeedsThread`. The loop looked at interrupts before the utterance's first chunk."""
        move = self._piece_move(entry, index, last, _RECORD_EVERY)
        message = self._audio_message(entry, pcm, last)
        self.no_wait = True
        try:
            self._send_moving(lambda: self._send(message, kind="audio", entry=entry), move)
        finally:
            self.no_wait = False

    def prepare_paced_chunk(self, entry: dict[str, Any], index: int, pcm: bytes, last: bool) -> PreparedChunk:
        """Chunk ``index`` for a room that folds (its write rides on the cursor move), up to the
        move itself, which the pacing loop makes for many rooms in one round trip
        (:meth:`Store.move_many`) and hands back to :meth:`commit_paced_chunk`. The steps of
        :meth:`_send`'s first attempt; what it would retry after a wait raises NeedsThread."""
        message = self._audio_message(entry, pcm, last)
        if not self.transport.connected:
            raise NeedsThread(f"the room of {self.cid} is to be rejoined")
        self._fenced()
        try:
            append = self.transport.prepare_append(message)
        except MessageTooLarge:
            raise
        except RetryableError as exc:
            metrics.send_retry(type(exc).__name__)
            raise NeedsThread(f"{type(exc).__name__}: {exc}") from exc
        return PreparedChunk(self._piece_call(entry, index, last, append), time.monotonic())

    def _piece_call(self, entry: dict[str, Any], index: int, last: bool, append: RoomAppend) -> MoveCall:
        """The fenced cursor move of piece ``index`` that also writes it into its room (refused
        when an interrupt came since this sender last looked)."""
        move = self._piece_move(entry, index, last, _RECORD_EVERY)
        return MoveCall(self.cid, self.token, move.seq, move.chunk, None, self.epoch, self.settings.lease_ttl_s,
                        move.utterance_id, move.chunks_sent, append, self.gen)

    def commit_paced_chunk(self, entry: dict[str, Any], prepared: PreparedChunk, moved: Moved) -> None:
        """The answer to a prepared chunk's move: the checks of :meth:`_advance` and the
        bookkeeping of a sent message."""
        if not moved.held:
            raise self._fenced_out()
        self.fence.renewed(prepared.requested)
        if not moved.done or (moved.gen > self.gen and prepared.call.chunk):
            raise Interrupted()
        self.pacer.sent()
        metrics.message_sent("audio", time.monotonic() - prepared.requested)
        self._note_first(entry)

    def _send_audio(self, entry: dict[str, Any], first_chunk: int, progress: Progress | None) -> int:
        put = self._audio_put(entry)
        stream = self._pcm_chunks(entry)
        try:
            if self.folds and not self.pacer.realtime and not self.pacer.min_gap:
                return self._deliver_batched(entry, stream, first_chunk, put, progress)
            return self._deliver(entry, stream, first_chunk, put, progress, entry.get("chunks_estimate"),
                                 every=_RECORD_EVERY)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()

    def _deliver(self, entry: dict[str, Any], pieces: Iterable[Any], first_chunk: int,
                 put: Callable[[bytes, bool], None], progress: Progress | None, total: int | None,
                 *, every: int, marked: bool = False) -> int:
        """Hand each piece of an utterance after the cursor to ``put``, in order, moving the cursor
        after each; returns how many pieces the utterance has. ``every``: how often the record's
        count is written (the cursor itself moves every time). ``marked``: ``pieces`` are already
        ``(pcm, last)`` pairs (a stream knows its last piece only when it ends; a lookahead
        would hold every piece back until the next one came)."""
        uid = entry["utterance_id"]
        index = -1
        items: Iterable[tuple[bytes, bool]] = pieces if marked else chunks.mark_last(pieces)
        for index, (pcm, last) in enumerate(items):
            if index < first_chunk:  # sent before a crash; the cursor says where to go on
                continue
            if index == first_chunk and not self.folds:  # later pieces learn of interrupts from each cursor move
                self._check_interrupt()
            if self.stopping():  # the cursor is at this piece: the next owner starts here
                raise Stopping()
            self._send_moving(functools.partial(put, pcm, last), self._piece_move(entry, index, last, every))
            if progress is not None:
                progress(uid, index + 1, total if not last else index + 1)
        if index < 0:
            raise PermanentError("the audio has no samples")
        return index + 1

    def _deliver_batched(self, entry: dict[str, Any], pieces: Iterable[bytes], first_chunk: int,
                         put: Callable[[bytes, bool], None], progress: Progress | None) -> int:
        """:meth:`_deliver` for burst pacing into a room that folds: up to ``_CHUNK_BATCH``
        chunks go in one round trip (:meth:`Store.move_many`, each chunk's write atomic with its
        own cursor move), so a crash between two of them repeats nothing."""
        index = -1
        batch: list[tuple[int, bytes, bool]] = []
        for index, (pcm, last) in enumerate(chunks.mark_last(pieces)):
            if index < first_chunk:  # sent before a crash; the cursor says where to go on
                continue
            batch.append((index, pcm, last))
            if len(batch) == _CHUNK_BATCH or last:
                self._send_batch(entry, batch, put, progress)
                batch = []
        if index < 0:
            raise PermanentError("the audio has no samples")
        return index + 1

    def _send_batch(self, entry: dict[str, Any], batch: list[tuple[int, bytes, bool]],
                    put: Callable[[bytes, bool], None], progress: Progress | None) -> None:
        """Chunks of one utterance in one round trip, in order; from the first one the room will
        not take now (a fault, a room to rejoin), one at a time with :meth:`_send`'s retries."""
        if self.stopping():  # the cursor is at the batch's first chunk: the next owner starts there
            raise Stopping()
        uid, total = entry["utterance_id"], entry.get("chunks_estimate")
        calls: list[MoveCall] = []
        if self.transport.connected:
            self._fenced()
            for index, pcm, last in batch:
                try:
                    append = self.transport.prepare_append(self._audio_message(entry, pcm, last))
                except (MessageTooLarge, RetryableError):
                    break
                calls.append(self._piece_call(entry, index, last, append))
        if calls:
            requested = time.monotonic()
            answers = self._record(functools.partial(self.store.move_many, calls), "cursor")
            for (index, _pcm, last), call, moved in zip(batch, calls, answers, strict=False):
                # a refusal (lease lost, an interrupt) refuses every chunk after it too
                self.commit_paced_chunk(entry, PreparedChunk(call, requested), moved)
                if progress is not None:
                    progress(uid, index + 1, total if not last else index + 1)
        for index, pcm, last in batch[len(calls):]:
            self._send_moving(functools.partial(put, pcm, last), self._piece_move(entry, index, last, _RECORD_EVERY))
            if progress is not None:
                progress(uid, index + 1, total if not last else index + 1)

    # one message ---------------------------------------------------------------------------

    def _check_interrupt(self) -> None:
        gen, _upto = self.store.interrupt_state(self.cid)
        if gen > self.gen:
            raise Interrupted()

    def _record(self, call: Callable[[], T], what: str) -> T:
        """Bookkeeping for what is already in the room: waits for Redis rather than failing."""
        return until_redis_answers(call, what=what, conversation=self.cid, wake=self.wake, give_up=self.stopping,
                                   max_delay_s=self.settings.redis_retry_max_delay_s)

    def _send_moving(self, send: Callable[[], None], move: _Move) -> None:
        """``send()`` one message, and move the cursor to ``move`` once it is in the room: in
        the same round trip when the room folds (:meth:`_send` makes the move), else after."""
        self._next_move = move
        try:
            send()
        finally:
            pending, self._next_move = self._next_move, None
        if pending is not None:  # not folded into the send (another transport, a microphone write)
            self._advance(move.seq, move.chunk, utterance_id=move.utterance_id, chunks_sent=move.chunks_sent)

    def _advance(self, seq: int, chunk: int, gen: int | None = None, *, utterance_id: str | None = None,
                 chunks_sent: int | None = None, append: RoomAppend | None = None) -> None:
        """Record that everything before (seq, chunk) is in the room. Fenced by the lease token;
        retried (not the send) while Redis is away; each move also renews the lease.

        With ``append`` the move writes the message into its room too, unless an interrupt came
        since this sender last looked (then nothing is written and :class:`Interrupted` is raised);
        a retry after a lost reply writes it at most once."""
        ttl = self.settings.lease_ttl_s
        refuse_above = self.gen if append is not None else None

        def move() -> Moved:
            requested = time.monotonic()
            moved = self.store.move(self.cid, self.token, seq, chunk, gen, epoch=self.epoch, ttl_s=ttl,
                                    utterance_id=utterance_id, chunks_sent=chunks_sent, append=append,
                                    refuse_above=refuse_above)
            if moved.held:
                self.fence.renewed(requested)
            return moved

        moved = self._record(move, "cursor")
        if not moved.held:
            if append is not None:  # the message was refused with the move: fenced in Redis itself
                raise self._fenced_out()
            # what was sent before this move is in the room; from here on this sender sends nothing
            step(log, "lease.lost", logging.WARNING, conversation=self.cid, token=self.token, at="cursor move")
            raise LeaseLost(f"lease on conversation {self.cid} lost")
        if not moved.done or (moved.gen > self.gen and chunk):
            raise Interrupted()

    def _fenced(self) -> None:
        """Return only if this process may send now: its fence is open, or a renewal just opened
        it. Costs no Redis round trip while the fence is open."""
        if self.fence.is_open():
            return
        ttl = self.settings.lease_ttl_s

        def renew() -> bool:
            requested = time.monotonic()
            held = self.store.renew_lease(self.cid, self.token, ttl, self.epoch)
            if held:
                self.fence.renewed(requested)
            return held

        # a renewal answered too slowly to open the fence proves nothing either way: ask again
        for _ in range(3):
            if not self._record(renew, "lease"):
                break
            if self.fence.is_open():
                return
        raise self._fenced_out(" before a send: nothing sent")

    def _fenced_out(self, detail: str = "") -> LeaseLost:
        """A send refused for a lease that is gone, counted and logged: the error to raise."""
        metrics.send_fenced()
        step(log, "send.fenced", logging.WARNING, conversation=self.cid, token=self.token)
        return LeaseLost(f"lease on conversation {self.cid} lost{detail}")

    def _wait_until(self, due: float, *, interruptible: bool = True) -> None:
        """Wait for ``due`` (monotonic). A wake-up (an interrupt, a stop) is looked at at once and
        then cleared, so it cannot make later waits return early."""
        while (delay := due - time.monotonic()) > 0:
            if self.wake.wait(delay):
                self.wake.clear()
                if interruptible:
                    self._check_interrupt()
                    if self.stopping():
                        raise Stopping()

    def _send(self, message: dict[str, Any], *, kind: str, entry: dict[str, Any] | None = None) -> None:
        """Send one message with retries; rejoin the room when the connection is gone."""
        s = self.settings
        for attempt in range(s.retry_max_attempts):
            self._wait_until(self.pacer.message_due(), interruptible=kind != "interrupt")
            t0 = time.monotonic()
            try:
                if not self.transport.connected:
                    if self.no_wait:
                        raise NeedsThread(f"the room of {self.cid} is to be rejoined")
                    self.transport.rejoin(s.join_timeout_s)
                    step(log, "rejoined", conversation=self.cid, ms=ms_since(t0))
                self._fenced()
                move = self._next_move if self.folds and kind != "interrupt" else None
                if move is None:
                    self.transport.send(message)
                else:  # the room's write and the cursor move, one round trip
                    append = self.transport.prepare_append(message)
                    self._next_move = None
                    self._advance(move.seq, move.chunk, utterance_id=move.utterance_id,
                                  chunks_sent=move.chunks_sent, append=append)
                self.pacer.sent()
            except MessageTooLarge:
                raise
            except (RoomDisconnected, JoinFailed) as exc:
                self._backoff(attempt, type(exc).__name__, exc)
                continue
            except RetryableError as exc:
                self._backoff(attempt, type(exc).__name__, exc)
                continue
            elapsed = time.monotonic() - t0
            metrics.message_sent(kind, elapsed)
            if entry is not None:
                self._note_first(entry)
            return
        raise SendExhausted(f"gave up on a {kind} message to {self.cid} after {s.retry_max_attempts} attempts")

    def _note_first(self, entry: dict[str, Any]) -> None:
        """Time from enqueue to the utterance's first message in the room, once per utterance."""
        if not entry.get("_first_sent"):
            entry["_first_sent"] = True
            enqueued = float(entry.get("enqueued_at") or 0)
            if enqueued:
                metrics.first_message(max(0.0, time.time() - enqueued))

    def _backoff(self, attempt: int, reason: str, exc: Exception) -> None:
        metrics.send_retry(reason)
        if self.no_wait:  # the pacing loop does not wait: a drain thread retries from the cursor
            raise NeedsThread(f"{reason}: {exc}") from exc
        s = self.settings
        cap = min(s.retry_max_delay_s, s.retry_base_delay_s * (2**attempt))
        delay = cap / 2 + random.uniform(0, cap / 2)
        step(log, "send.retry", logging.WARNING, conversation=self.cid, attempt=attempt + 1, reason=reason,
             detail=str(exc), delay_ms=delay * 1000)
        if self.wake.wait(delay):
            self.wake.clear()
        if self.stopping():
            raise SendExhausted(f"stopping while retrying a send to {self.cid}")
