"""One pacing loop for every conversation a worker process paces in real time.

In real-time pacing an audio utterance's chunks go one chunk interval apart, for as long as the
audio plays. A sender that slept between chunks would hold a thread of the worker's pool for the
whole utterance, and a worker could speak in no more rooms than it has threads. Instead, a drain
(on a pool thread) does the start of an utterance — claim it, open its decoder — and hands it to
this loop (:class:`Handed` unwinds the drain and frees the thread, the session stays busy). The
loop is one thread with a heap of due times: when a conversation's next chunk is due it sends it
with the sender's own code (fence, folded cursor move, interrupt check), computes when the next
one is due, and goes on to the next conversation. Decoding runs ahead on a thread per playing
utterance (:class:`~worker.readahead.ReadAhead`), so the loop never waits for a decoder.

Rooms share the Redis round trips: a chunk goes at the tick of a shared grid (``tick_s``, 10 ms
for 40 ms chunks) at or before its due time, so the chunks of every room due within one tick go
in one pipelined call. The tick divides the chunk interval, so each utterance's chunks keep one
constant offset from their due times (its spacing is exactly real time, a few ms earlier), and
one process sends ~25 chunks a round trip at 100 rooms instead of one or two.

The loop never waits for anything but Redis: a step that would (a send to retry after a back-off,
a room to rejoin) gives the utterance back to a drain thread (:class:`NeedsThread`), which
resumes it from the cursor with the whole retry logic — the message was not sent, so nothing is
repeated. What follows an utterance (its record, failure, interrupt, a lost lease) runs on a
small executor and then rings the conversation's doorbell, and the next drain takes the next
entry, whose decoder was started while this one played (no gap between utterances).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

import redis

from . import metrics
from .errors import EchoqError, Interrupted, LeaseLost, PermanentError, Stopping
from .fencing import until_redis_answers
from .logs import step
from .readahead import ReadAhead
from .store import MoveCall, Moved, Store

log = logging.getLogger("echoq.pacing")

#: chunks decoded ahead of the one due (about two seconds of 40 ms chunks)
AHEAD_CHUNKS = 50
#: the most chunks the loop sends in one round trip
MAX_BATCH = 256
#: threads that send to rooms whose write cannot ride on the cursor move (Daily)
SERIAL_SENDERS = 16
#: the longest tick of the shared send grid, ms (see :func:`tick_for`)
MAX_TICK_MS = 10


def tick_for(chunk_ms: int) -> float:
    """The send grid's tick for chunks of ``chunk_ms``, in seconds: the largest divisor of the
    chunk interval up to ``MAX_TICK_MS``, so every chunk of an utterance sits the same distance
    ahead of its due time."""
    return math.gcd(chunk_ms, MAX_TICK_MS) / 1000


def on_grid(due: float, tick: float) -> float:
    """The tick at or before ``due`` (monotonic seconds); ``due`` itself when there is no grid."""
    return math.floor(due / tick + 1e-9) * tick if tick else due


class PreparedChunk(NamedTuple):
    """A paced chunk ready to go: its cursor move (with the room's write), and when it was made."""

    call: MoveCall
    requested: float


class Handed(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The utterance went to the pacing loop: the drain's thread is free, the session stays busy."""


class NeedsThread(EchoqError):
    """A step the loop must not wait for (a retry's back-off, a rejoin): a drain thread resumes
    the utterance from its cursor, where nothing of the failed message was recorded."""


class Sender(Protocol):
    """What the loop uses of a conversation's sender (:class:`worker.sender.Sender`)."""

    store: Store
    folds: bool
    wake: threading.Event
    pacer: Any

    def stopping(self) -> bool: ...
    def check_interrupt(self) -> None: ...
    def take_reader(self, entry: dict[str, Any]) -> ReadAhead: ...
    def prepare_paced_chunk(self, entry: dict[str, Any], index: int, pcm: bytes, last: bool) -> PreparedChunk: ...
    def commit_paced_chunk(self, entry: dict[str, Any], prepared: PreparedChunk, moved: Moved) -> None: ...
    def send_paced_chunk(self, entry: dict[str, Any], index: int, pcm: bytes, last: bool) -> None: ...
    def finish_sent(self, entry: dict[str, Any], sent: int, t0: float, *, paced: str | None = None) -> None: ...
    def mark_interrupted(self, entry: dict[str, Any]) -> None: ...
    def fail(self, entry: dict[str, Any], exc: PermanentError, *, cut: bool) -> None: ...
    def resume_on_thread(self, entry: dict[str, Any]) -> None: ...
    def drop_prefetched(self) -> None: ...


class Owner:
    """What the loop needs of a session: let it go when the utterance leaves the loop."""

    cid: str

    def loop_released(self, outcome: str) -> None:
        raise NotImplementedError


class Playout:
    """One audio utterance being paced by the loop."""

    def __init__(self, owner: Owner, sender: Sender, entry: dict[str, Any], first_chunk: int,
                 reader: ReadAhead, tick: float = 0.0) -> None:
        self.owner = owner
        self.sender = sender
        self.entry = entry
        self.first_chunk = first_chunk
        self.reader = reader
        self.rate = int(entry["sample_rate"])
        self.tick = tick
        self.index = -1  # the last chunk taken from the reader
        self.pending: tuple[bytes, bool] | None = None  # taken, waiting for its due time
        self.due = 0.0
        self.version = 0  # heap entries of older versions are stale
        self.started = time.monotonic()
        self.poked = False
        self.busy = False  # its chunk is being sent on a thread of the serial pool
        self.left = False  # it left the loop: nothing schedules it again

    def advance(self) -> float | PreparedChunk | None:
        """Look at interrupts and stops, take the next chunk and work out when it is due.
        Returns when it is due (monotonic; ``inf`` while the reader has none ready: it calls
        back), the chunk prepared to go now (a room that folds), or None: send it now with
        :meth:`send_serial` (any other room)."""
        s = self.sender
        if self.poked or s.wake.is_set():  # an interrupt or a stop was rung
            self.poked = False
            s.wake.clear()
            s.check_interrupt()
        while self.pending is None:
            got = self.reader.poll()
            if got is None:
                return float("inf")
            kind, value = got
            if kind == "end":  # the decoder gave nothing at all: mark_last flags the last chunk
                raise PermanentError("the audio has no samples")
            pcm, last = value
            self.index += 1
            if self.index < self.first_chunk:  # sent before a hand-over: the cursor is past it
                if last:
                    raise PermanentError("the audio ends before the cursor: nothing left to send")
                continue
            self.pending = (pcm, last)
            due = max(s.pacer.audio_due(len(pcm) / (2 * self.rate)), s.pacer.message_due())
            self.due = on_grid(due, self.tick)
        now = time.monotonic()
        if self.due > now:
            return self.due
        if s.stopping():
            raise Stopping()
        # the first chunk is due one interval before its clock starts (the pacer keeps a chunk
        # ahead of playback): it is late only from when the loop got it
        metrics.pacing_lateness(now - max(self.due, self.started))
        pcm, last = self.pending
        if self.index == self.first_chunk and not s.folds:
            s.check_interrupt()
        if s.folds:
            return s.prepare_paced_chunk(self.entry, self.index, pcm, last)
        return None

    def committed(self, prepared: PreparedChunk, moved: Moved) -> bool:
        """The pending chunk's batched move came back; True when it was the last chunk."""
        self.sender.commit_paced_chunk(self.entry, prepared, moved)
        return self._sent()

    def send_serial(self) -> bool:
        """Send the pending chunk with the sender's own send (a room that does not fold); True
        when it was the last chunk."""
        assert self.pending is not None
        pcm, last = self.pending
        self.sender.send_paced_chunk(self.entry, self.index, pcm, last)
        return self._sent()

    def _sent(self) -> bool:
        assert self.pending is not None
        last = self.pending[1]
        self.pending = None
        return last


class PacingLoop:
    """The loop: a heap of due playouts, one thread that sends, an executor for what follows."""

    def __init__(self, *, ring: Callable[[str], None], drop: Callable[[str, str], None],
                 name: str = "echoq-pacing", tick_s: float = 0.0) -> None:
        self._ring = ring
        self.tick_s = tick_s
        self._drop = drop
        self._heap: list[tuple[float, int, int, Playout]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._playing: dict[str, Playout] = {}
        self._after = ThreadPoolExecutor(max_workers=4, thread_name_prefix="echoq-after")
        #: sends to rooms that do not fold (a Daily call waits for its completion): a bounded
        #: pool, so one slow room holds one of these threads, never the loop
        self._serial = ThreadPoolExecutor(max_workers=SERIAL_SENDERS, thread_name_prefix="echoq-pace-send")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # outside the loop ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._after.shutdown(wait=False, cancel_futures=False)
        self._serial.shutdown(wait=False, cancel_futures=False)

    def playing(self) -> int:
        return len(self._playing)

    def hand(self, owner: Owner, sender: Sender, entry: dict[str, Any], first_chunk: int) -> None:
        """Take one utterance (its record claimed, its events written) from a drain; raises
        :class:`Handed` to unwind that drain."""
        reader = sender.take_reader(entry)
        playout = Playout(owner, sender, entry, first_chunk, reader, self.tick_s)
        reader.on_ready = lambda: self._schedule(playout, 0.0)
        sender.pacer.start_utterance()
        self._playing[owner.cid] = playout
        metrics.pacing_playing(len(self._playing))
        step(log, "pacing.took", conversation=owner.cid, utterance=entry["utterance_id"], seq=entry["seq"],
             resume_chunk=first_chunk or None)
        self._schedule(playout, 0.0)
        raise Handed(entry["utterance_id"])

    def poke(self, cid: str) -> None:
        """An interrupt or a stop for ``cid``: its playout looks at once, not at its next chunk."""
        playout = self._playing.get(cid)
        if playout is not None:
            playout.poked = True
            self._schedule(playout, 0.0)

    def _schedule(self, playout: Playout, due: float) -> None:
        with self._cond:
            if playout.left:  # a reader calling back after the utterance left the loop
                return
            playout.version += 1
            heapq.heappush(self._heap, (due, next(self._order), playout.version, playout))
            self._cond.notify()

    # the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch: list[tuple[Playout, int]] = []
            with self._cond:
                while not self._stopped:
                    if self._heap:
                        wait = self._heap[0][0] - time.monotonic()
                        if wait <= 0:
                            break
                        self._cond.wait(min(wait, 1.0))
                    else:
                        self._cond.wait(1.0)
                if self._stopped:
                    return
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now and len(batch) < MAX_BATCH:
                    _, _, version, playout = heapq.heappop(self._heap)
                    if version == playout.version and not playout.busy:
                        batch.append((playout, version))
            try:
                self._step(batch)
            except Exception:  # a bug here must not end the loop (and with it every room's audio)
                log.exception("pacing loop step failed")

    def _step(self, batch: list[tuple[Playout, int]]) -> None:
        ready: list[tuple[Playout, int, PreparedChunk]] = []
        for playout, version in batch:
            try:
                nxt = playout.advance()
            except BaseException as exc:  # every outcome but "due again" leaves the loop
                self._leave(playout, exc)
                continue
            if isinstance(nxt, PreparedChunk):
                ready.append((playout, version, nxt))
            elif nxt is None:
                playout.busy = True  # the loop does not step it while its send is out
                self._serial.submit(self._send_serial, playout, version)
            elif nxt != float("inf"):
                self._again(playout, version, nxt)
        if ready:
            self._commit(ready)

    def _commit(self, ready: list[tuple[Playout, int, PreparedChunk]]) -> None:
        """Every ready chunk's cursor move and room write, in one round trip; retried with the
        same send ids while Redis does not answer (a lost reply writes nothing twice)."""
        store = ready[0][0].sender.store
        calls = [prepared.call for _, _, prepared in ready]
        try:
            answers = until_redis_answers(
                lambda: store.move_many(calls), what="paced chunks", conversation=f"{len(calls)} rooms",
                wake=threading.Event(), give_up=lambda: self._stopped or all(p.sender.stopping() for p, _, _ in ready),
                max_delay_s=1.0)
        except redis.RedisError as exc:  # stopping while Redis is away: each room's next owner resumes
            for playout, _, _ in ready:
                self._leave(playout, exc)
            return
        for (playout, version, prepared), moved in zip(ready, answers, strict=True):
            try:
                last = playout.committed(prepared, moved)
            except BaseException as exc:
                self._leave(playout, exc)
                continue
            if last:
                self._leave(playout, None)
            else:
                self._again(playout, version, 0.0)

    def _send_serial(self, playout: Playout, version: int) -> None:
        try:
            last = playout.send_serial()
        except BaseException as exc:
            playout.busy = False
            self._leave(playout, exc)
            return
        playout.busy = False
        if last:
            self._leave(playout, None)
        else:  # whatever was scheduled for it while it was busy was passed over: step it now
            self._again(playout, None, 0.0)

    def _again(self, playout: Playout, version: int | None, due: float) -> None:
        """Step ``playout`` again at ``due``, unless a poke or a decoded chunk scheduled it
        since ``version`` (then that, sooner, stands); ``None``: in any case."""
        with self._cond:
            if not playout.left and (version is None or playout.version == version):
                playout.version += 1
                heapq.heappush(self._heap, (due, next(self._order), playout.version, playout))
                self._cond.notify()

    def _leave(self, playout: Playout, exc: BaseException | None) -> None:
        with self._cond:
            if playout.left:
                return
            playout.left = True
            playout.version += 1  # whatever is still in the heap for it is stale now
        if self._playing.get(playout.owner.cid) is playout:
            del self._playing[playout.owner.cid]
        metrics.pacing_playing(len(self._playing))
        self._after.submit(self._after_playout, playout, exc)
    def _after_playout(self, playout: Playout, exc: BaseException | None) -> None:
        """What follows an utterance that left the loop, on the executor: records, then the
        session is let go and its doorbell rung so the next drain goes on from the cursor."""
        sender, entry, cid = playout.sender, playout.entry, playout.owner.cid
        outcome = "sent"
        try:
            playout.reader.close()
            if exc is None:
                sender.finish_sent(entry, playout.index + 1, playout.started, paced="loop")
            elif isinstance(exc, Interrupted):
                outcome = "interrupted"
                sender.mark_interrupted(entry)
            elif isinstance(exc, Stopping):
                outcome = "stopping"
                step(log, "sender.stopped", conversation=cid, seq=entry["seq"])
            elif isinstance(exc, LeaseLost):
                outcome = "lease lost"
            elif isinstance(exc, PermanentError):
                outcome = "failed"
                sender.fail(entry, exc, cut=bool(entry.get("_first_sent")) or playout.first_chunk > 0)
            else:  # a send to retry, a room to rejoin, Redis away: a drain resumes at the cursor
                outcome = "handed back"
                sender.resume_on_thread(entry)
                if not isinstance(exc, (EchoqError, redis.RedisError)):
                    log.error("pacing step for %s failed", cid, exc_info=exc)
                step(log, "pacing.handed_back", logging.WARNING, conversation=cid, utterance=entry["utterance_id"],
                     reason=f"{type(exc).__name__}: {exc}")
        except Exception:
            log.exception("after the playout of %s", cid)
            outcome = "handed back"
        finally:
            if outcome != "sent":
                sender.drop_prefetched()
            playout.owner.loop_released(outcome)
        if outcome == "lease lost":
            self._drop(cid, "lease lost")
        elif outcome != "stopping":
            try:
                self._ring(cid)
            except Exception as ring_exc:  # the supervisor rings a backlog nobody drains
                log.warning("ringing %s after its playout failed: %s", cid, ring_exc)
