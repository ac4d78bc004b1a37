"""Room sessions held by one worker process, and the supervisor that keeps them honest.

A worker owns a conversation while it holds its lease (``SET NX PX`` in Redis). While it does,
it consumes the conversation's queue, renews the lease, and drains the log whenever there is a
backlog and nobody is draining (so a lost doorbell only delays, never loses). A worker that
finds its lease gone stops sending at once and leaves the room on a "leaving" thread: the
supervisor never waits for a broadcast, a sender or a room, so one slow leave cannot make the
other leases lapse. Conversations whose lease has expired (their owner died) are adopted by any
worker with room for more.

A worker that cannot keep up (its supervisor wakes late scan after scan, or its real-time
senders fall behind) sheds: it adopts nothing for ``ECHOQ_SHED_COOLDOWN_S`` (its published
limit drops to what it holds) and lets go of one conversation per lease TTL, the most recently
adopted first, idle ones before busy ones, each between two utterances, with a
``conversation.shed`` event; another worker takes it, or it waits visibly (:mod:`worker.capacity`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_all
from typing import TYPE_CHECKING, Any

import redis
from celery.utils.nodenames import worker_direct

from . import capacity, echo, keys, metrics, retention, sealing
from .errors import EchoqError, PermanentError, RetryableError
from .logs import ms_since, step
from .pacing import Handed, Owner, PacingLoop, tick_for
from .sender import LeaseLost, Progress, Sender
from .settings import Settings
from .store import Store, text
from .streams import HandOver
from .transports import Transport, open_transport
from .transports.base import REPLICA_JOINED, REPLICA_LEFT

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("echoq.sessions")

SPEAKING_STARTED = {echo.STARTED_SPEAKING, "conversation.started_speaking"}
SPEAKING_STOPPED = {echo.STOPPED_SPEAKING, "conversation.stopped_speaking"}
#: how many replica starts and stops are remembered to count each once
_SEEN_EVENTS = 4096
#: threads that leave rooms (cancel the queue's consumer, wait for the sender, leave, release)
LEAVING_THREADS = 4
#: supervisor scans in a row that must wake late before the worker counts as unable to keep up
LATE_SCANS = 2


class Session(Owner):
    """One conversation's room connection and its ordered sender."""

    def __init__(self, manager: SessionManager, conversation_id: str, url: str, mode: str, token: str,
                 transport: Transport, epoch: int | None = None, taken_at: float | None = None,
                 wire_id: str | None = None) -> None:
        self.manager = manager
        self.cid = conversation_id
        self.url = url
        self.mode = mode
        self.token = token
        self.epoch = epoch
        self.transport = transport
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.pending = threading.Event()
        self.draining = False
        self.unanswered = 0  # supervisor scans that found a backlog and nobody draining it
        self.replica_ready = False
        self.stopped = False
        self.renewed_at = time.monotonic() if taken_at is None else taken_at
        self.taken_at = self.renewed_at
        #: why the worker lets this conversation go (it could not keep up), once it chose it
        self.shedding: str | None = None
        #: whether the sender is part-way through an utterance (it stops for shedding only between two)
        self.mid_utterance = False
        #: real-time lateness: (when, the pacer's count then) at the start of the window, and the last verdict
        self.late_mark = (self.renewed_at, 0)
        self.behind = False
        sender_cls: type[Sender] = Sender
        if mode == "microphone":
            from .microphone import MicrophoneSender

            sender_cls = MicrophoneSender
        self.sender = sender_cls(conversation_id, store=manager.store, transport=transport, settings=manager.settings,
                                 token=token, wake=self.wake, stopping=self._stopping, epoch=epoch,
                                 wire_id=wire_id)
        # the fence opens from when the lease was *requested*, never from when this ran
        self.fence = self.sender.fence
        self.fence.renewed(self.renewed_at)
        loop = manager.loop
        if loop is not None and mode != "microphone":
            self.sender.handoff = self._hand_to_loop

    def _stopping(self) -> bool:
        """Whether the sender stops here: at once when the worker lets the conversation go, and
        between two utterances when it sheds it."""
        return self.stopped or (self.shedding is not None and not self.mid_utterance)

    def drain(self, progress: Progress | None = None) -> int:
        """Send the backlog. Only one thread sends; a second caller leaves a note and returns."""
        handled = 0

        def noted(utterance_id: str, sent: int, total: int | None) -> None:
            # the last piece of an utterance is reported with ``sent == total``
            self.mid_utterance = sent != total
            if progress is not None:
                progress(utterance_id, sent, total)

        while True:
            if not self.lock.acquire(blocking=False):
                self.pending.set()  # the thread that holds the lock looks at this before it lets go
                return handled
            handed = False
            try:
                self.draining = True
                self.pending.clear()
                self.mid_utterance = False  # a resumed utterance may stop before its next piece
                if not self.replica_ready:
                    self.transport.wait_for_replica(self.manager.settings.replica_wait_timeout_s)
                    self.replica_ready = True
                handled += self.sender.drain(noted)
            except Handed:
                # the pacing loop sends the utterance and lets go of the session when it is done
                # (loop_released), then rings the doorbell: the next drain goes on from there
                handed = True
                return handled
            except RetryableError as exc:
                # the backlog stays; the supervisor rings again. Say why where people look.
                self.manager.store.set_conversation_fields(self.cid, last_error=str(exc))
                self.manager.store.add_event(self.cid, {"type": "delivery.stalled", "error": str(exc)})
                step(log, "delivery.stalled", logging.WARNING, conversation=self.cid, reason=str(exc))
                raise
            finally:
                if not handed:
                    self.draining = False
                    self.lock.release()
            if self.stopped or self.shedding is not None or not self.pending.is_set():
                return handled

    def _hand_to_loop(self, sender: Sender, entry: dict[str, Any], first_chunk: int) -> None:
        loop = self.manager.loop
        assert loop is not None
        self.mid_utterance = True  # shedding waits for the loop to finish it
        loop.hand(self, sender, entry, first_chunk)

    def loop_released(self, outcome: str) -> None:
        """The pacing loop is done with this session's utterance (``outcome``): let it go."""
        self.mid_utterance = False
        self.draining = False
        self.lock.release()

    def poke(self) -> None:
        """Make the sender look at its interrupt generation and stop flag now."""
        self.wake.set()
        if self.manager.loop is not None:
            self.manager.loop.poke(self.cid)

    def stop(self) -> None:
        """Finish the message in flight, then stop sending (the utterance resumes elsewhere)."""
        self.stopped = True
        self.poke()


class SessionManager:
    """The sessions of this worker process, their leases and their room events."""

    def __init__(self, app: Celery, settings: Settings, client: redis.Redis, hostname: str | None = None,
                 threads: int | None = None) -> None:
        self.app = app
        self.settings = settings
        #: the worker's pool size, and the most conversations it serves at the configured pacing
        self.threads = threads or settings.worker_concurrency
        self.limit = capacity.session_limit(settings, self.threads)
        self.waiting = capacity.Waiting(client)
        self.redis = client
        self.store = Store(client)
        self.hostname = hostname or f"echoq-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._adopting: set[str] = set()
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._free_since: dict[str, float] = {}
        #: conversations closed here -> (when, room url): their keys get a second retention pass
        self._closed_at: dict[str, tuple[float, str]] = {}
        self._events: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="echoq-adopt")
        # drains the supervisor starts itself (see _tick); apart from adoption, which they must not
        # hold up while one waits for a replica
        self._drains = ThreadPoolExecutor(max_workers=2, thread_name_prefix="echoq-drain")
        # leaving rooms: a broadcast to a slow broker, a sender finishing its message and a room's
        # leave never hold up the supervisor (see drop)
        self._leaving_pool = ThreadPoolExecutor(max_workers=LEAVING_THREADS, thread_name_prefix="echoq-leave")
        #: conversations let go here whose room is still being left: not taken back until it is
        self._leaving: set[str] = set()
        self._pending: set[Future[None]] = set()
        #: conversations shed here -> when: not taken back within the cooldown
        self._shed_at: dict[str, float] = {}
        #: until when this worker adopts nothing (monotonic), and when it last shed
        self._shed_until = 0.0
        self._last_shed = float("-inf")
        self._late_scans = 0
        self._threads: list[threading.Thread] = []
        self.shutting_down = False
        #: real-time pacing: one loop sends every room's echo audio (see worker.pacing)
        self.loop: PacingLoop | None = None
        if settings.pacing == "realtime" and settings.pacing_loop:
            self.loop = PacingLoop(ring=lambda cid: self.ring(cid, here=True),
                                   drop=lambda cid, reason: self.drop(cid, reason, release=False, wait=False),
                                   tick_s=tick_for(settings.chunk_ms))

    # lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        for target, name in ((self._supervise, "echoq-supervisor"), (self._handle_events, "echoq-room-events"),
                             (self._listen_for_interrupts, "echoq-interrupts")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if self.loop is not None:
            self.loop.start()
        step(log, "worker.started", worker=self.hostname, max_sessions=self.limit, threads=self.threads,
             pacing=self.settings.pacing)

    def begin_shutdown(self) -> None:
        """Warm shutdown has begun: every sender finishes its current utterance, then stops."""
        self.shutting_down = True
        for session in list(self.sessions.values()):
            session.stop()

    def shutdown(self) -> None:
        """Hand every conversation back (release leases) and leave every room: the rooms are
        left on the leaving threads, side by side, and this returns once all are left."""
        self.begin_shutdown()
        self._stop.set()
        for cid in list(self.sessions):
            self.drop(cid, "worker shutdown", wait=False)
        with self._lock:
            pending = list(self._pending)
        done, _ = wait_for_all(pending)
        self._events.put(None)
        if self.loop is not None:
            self.loop.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._drains.shutdown(wait=False, cancel_futures=True)
        self._leaving_pool.shutdown(wait=False)
        failed = [exc for f in done if (exc := f.exception()) is not None]
        if failed:
            raise failed[0]
        self.redis.hdel(keys.WORKERS, self.hostname)
        step(log, "worker.stopped", worker=self.hostname)

    def _listen_for_interrupts(self) -> None:
        """Poke a conversation held here as soon as an interrupt for it is published (the
        interrupt script does): otherwise its sender finds the interrupt at its next message (a
        chunk interval later, in real time) or when the Celery doorbell comes, which waits behind
        the conversation's queued doorbells. A hint only: one missed while Redis is away changes
        how soon, not what is sent."""
        channel = keys.interrupts_channel(self.store.db)
        while not self._stop.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        session = self.sessions.get(text(message["data"]))
                        if session is not None:
                            session.poke()
            except Exception as exc:  # Redis away, or the client closed under it at shutdown
                log.debug("interrupt channel: %s", exc)
                self._stop.wait(1.0)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    # ownership -----------------------------------------------------------------------------

    def get(self, conversation_id: str) -> Session | None:
        return self.sessions.get(conversation_id)

    def limit_now(self, now: float | None = None) -> int:
        """The most conversations this worker holds now: its limit, or while it sheds (it could
        not keep up lately) no more than it holds."""
        now = time.monotonic() if now is None else now
        return min(self.limit, len(self.sessions)) if now < self._shed_until else self.limit

    def _shed_lately(self, cid: str, now: float) -> bool:
        return now - self._shed_at.get(cid, float("-inf")) < self.settings.shed_cooldown_s

    def adopt(self, conversation_id: str) -> Session | None:
        """Take the conversation if it is free and this worker has room; join its room."""
        with self._lock:
            if conversation_id in self.sessions:
                return self.sessions[conversation_id]
            now = time.monotonic()
            if (self.shutting_down or conversation_id in self._adopting or conversation_id in self._leaving
                    or self._shed_lately(conversation_id, now)
                    or len(self.sessions) + len(self._adopting) >= self.limit_now(now)):
                return None
            self._adopting.add(conversation_id)
        try:
            return self._adopt(conversation_id)
        finally:
            with self._lock:
                self._adopting.discard(conversation_id)

    def _adopt(self, cid: str) -> Session | None:
        conv = self.store.conversation(cid)
        if not conv or conv.get("state") == "closed":
            return None
        if self._closed_unjoined(cid, conv) or not self._room_for(conv.get("mode", "echo")):
            return None
        token = f"{self.hostname}:{uuid.uuid4().hex[:8]}"
        taken_at = time.monotonic()
        epoch = self.store.take_lease(cid, token, self.settings.lease_ttl_s)
        if not epoch:
            return None
        if (self.store.conversation(cid) or {}).get("state") == "closed":  # closed while we looked
            self.store.release_lease(cid, token)
            return None
        t0 = time.monotonic()
        step(log, "conversation.taken", conversation=cid, worker=self.hostname)
        transport: Transport | None = None
        try:
            sealed = conv.get(sealing.TOKEN_FIELD)
            meeting_token = sealing.unseal(sealed, self.settings.secret_key) if sealed else None
            transport = open_transport(conv["url"], redis_client=self.redis, settings=self.settings,
                                       on_event=lambda ev: self._events.put((cid, ev)), meeting_token=meeting_token)
            transport.origin = token
            transport.join(self.settings.join_timeout_s)
        except Exception as exc:
            if not isinstance(exc, EchoqError):
                log.exception("joining %s failed", cid)
            if transport is not None:
                transport.leave()
            self.store.release_lease(cid, token)
            if not self._closed_unjoined(cid, self.store.conversation(cid) or {}):
                self._note_failure(cid, exc)
            return None
        session = Session(self, cid, conv["url"], conv.get("mode", "echo"), token, transport, epoch, taken_at,
                          conv.get("wire_id"))
        with self._lock:
            self.sessions[cid] = session
        self._failures.pop(cid, None)
        self.store.set_conversation_fields(cid, owner=self.hostname, joined_at=f"{time.time():.6f}", last_error="",
                                           waiting="", waiting_since="")
        self.store.add_event(cid, {"type": "conversation.joined", "worker": self.hostname})
        step(log, "room.joined", conversation=cid, worker=self.hostname, ms=ms_since(t0))
        self.app.control.add_consumer(keys.conv_queue(cid), destination=[self.hostname])
        metrics.sessions_held(len(self.sessions))
        self.ring(cid, here=True)
        return session

    def _room_for(self, mode: str) -> bool:
        """Whether one more conversation in ``mode`` keeps every real-time sender served."""
        if not capacity.holds_a_thread(self.settings, mode):
            return True
        paced = sum(1 for s in list(self.sessions.values()) if capacity.holds_a_thread(self.settings, s.mode))
        return paced < capacity.realtime_slots(self.threads)

    def _closed_unjoined(self, cid: str, conv: dict[str, str]) -> bool:
        """Close a conversation that is closing with nothing left to send and no room joined:
        there is nothing to leave, and joining only to leave would keep it ``closing`` for as
        long as its room cannot be joined."""
        if (conv.get("state") != "closing" or self.store.backlog(cid) or cid in self.sessions
                or self.store.lease_owner(cid) is not None):
            return False
        self.store.mark_closed(cid)
        self._retry_at.pop(cid, None)
        self._failures.pop(cid, None)
        step(log, "room.left", conversation=cid, worker=self.hostname, reason="closed before joining")
        return True

    def _note_failure(self, cid: str, exc: Exception) -> None:
        n = self._failures.get(cid, 0) + 1
        self._failures[cid] = n
        self._retry_at[cid] = time.monotonic() + min(60.0, 0.5 * 2**n)
        self.store.set_conversation_fields(cid, last_error=str(exc))
        self.store.add_event(cid, {"type": "conversation.join_failed", "error": str(exc)})
        step(log, "room.join_failed", logging.WARNING, conversation=cid, attempt=n, reason=str(exc))

    def drop(self, cid: str, reason: str, *, release: bool = True, wait: bool = True,
             then: Callable[[], None] | None = None) -> None:
        """Stop sending, stop consuming, leave the room, hand the lease back (``release``), then
        ``then()``.

        The session stops sending and is no longer held (nor renewed, nor counted) at once; the
        rest (a broadcast that a slow broker can hold up, the wait for the sender's message in
        flight, the room's leave) happens here, or with ``wait=False`` on a leaving thread, so
        that the caller (the supervisor) goes on at once."""
        session = self._detach(cid)
        if session is None:
            if then is not None:
                then()
            return
        if wait:
            self._leave(cid, session, reason, release, then)
        else:
            self._leave_later(cid, session, reason, release, then)

    def _detach(self, cid: str, session: Session | None = None) -> Session | None:
        """Take the conversation's session (``session`` only) off this worker's books and stop
        its sender: it is no longer renewed, counted or adopted again until its room is left."""
        with self._lock:
            current = self.sessions.get(cid)
            if current is None or (session is not None and current is not session):
                return None
            del self.sessions[cid]
            self._leaving.add(cid)
        current.stop()
        current.fence.close()  # any send from here on asks Redis first
        metrics.sessions_held(len(self.sessions))
        return current

    def _leave_later(self, cid: str, session: Session, reason: str, release: bool,
                     then: Callable[[], None] | None) -> None:
        try:
            future = self._leaving_pool.submit(self._leave, cid, session, reason, release, then)
        except RuntimeError:  # the pool is shut down: the worker is stopping, so leave here
            self._leave(cid, session, reason, release, then)
            return
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(lambda f: self._left(cid, f))

    def _left(self, cid: str, future: Future[None]) -> None:
        with self._lock:
            self._pending.discard(future)
        exc = future.exception()
        if exc is not None and not self._stop.is_set():  # at shutdown, shutdown() says it once
            log.warning("leaving %s did not finish: %s (its lease expires on its own)", cid, exc)

    def _leave(self, cid: str, session: Session, reason: str, release: bool,
               then: Callable[[], None] | None) -> None:
        try:
            try:
                self.app.control.cancel_consumer(keys.conv_queue(cid), destination=[self.hostname])
            except Exception as exc:  # the broker may be gone at shutdown; the lease still expires
                log.warning("cancel_consumer for %s failed: %s", cid, exc)
            # wait for the sender to finish its message in flight before leaving the room
            if session.lock.acquire(timeout=self.settings.send_timeout_s * 2):
                session.sender.drop_prefetched()  # a decoder started ahead for what is not sent here
                session.lock.release()
            session.transport.leave()
            if release:
                self.store.release_lease(cid, session.token)
            metrics.forget_conversation(cid)
            step(log, "room.left", conversation=cid, worker=self.hostname, reason=reason)
            if then is not None:
                then()
        finally:
            with self._lock:
                self._leaving.discard(cid)

    def ring(self, cid: str, *, here: bool = False) -> None:
        """Ring the conversation's doorbell: its owner drains the log. ``here``: ring this
        worker's own queue instead (it owns the conversation and reads that queue already)."""
        queue: Any = worker_direct(self.hostname) if here else keys.conv_queue(cid)
        self.app.send_task(keys.TASK_DRAIN, args=[cid], queue=queue)

    def drain(self, cid: str, progress: Progress | None = None) -> int:
        """Drain as the owner; adopt first when nobody owns the conversation."""
        session = self.get(cid) or self.adopt(cid)
        if session is None:
            return 0
        try:
            return session.drain(progress)
        except LeaseLost as exc:
            handing_over = isinstance(exc, HandOver)
            if handing_over and session.shedding is not None and not session.stopped:
                return 0  # a stream stopped before its first piece: the supervisor lets it go at its next scan
            # a worker that stops in the middle of a stream still holds the lease: hand it back
            self.drop(cid, "worker stopping" if handing_over else "lease lost", release=handing_over, wait=False)
            return 0

    def _drain_here(self, cid: str) -> None:
        try:
            self.drain(cid)
        except (EchoqError, redis.RedisError) as exc:  # the backlog stays; the next scan tries again
            log.warning("drain of %s from the supervisor stopped: %s", cid, exc)

    def close(self, cid: str) -> None:
        """Send what is left, then leave and mark the conversation closed."""
        if self.store.backlog(cid):
            self.drain(cid)
        if self.store.backlog(cid) == 0:
            self._close_now(cid)

    def _close_now(self, cid: str, *, wait: bool = True) -> None:
        session = self.sessions.get(cid)
        url = session.url if session else ""

        def expire() -> None:
            # after the leave: the queue is no longer consumed, so its leftover doorbells can go
            expiring = retention.expire_conversation(self.redis, cid, self.settings.retention_s)
            self._closed_at[cid] = (time.monotonic(), url)
            step(log, "conversation.expiring", conversation=cid, keys=expiring, ttl_s=self.settings.retention_s)

        # closed first, then the lease goes: a worker scanning for free conversations in between
        # must find this one closed, not free
        self.store.mark_closed(cid)
        self.drop(cid, "closed", wait=wait, then=expire)

    # the supervisor ------------------------------------------------------------------------

    def _supervise(self) -> None:
        interval = self.settings.scan_interval_s
        expected = time.monotonic() + interval
        while not self._stop.wait(interval):
            # how late this scan woke: a process short of CPU (or of the GIL) wakes late; a slow
            # Redis makes the scan itself long instead, which is not counted here
            late_s = max(0.0, time.monotonic() - expected)
            try:
                self._tick(late_s)
            except redis.RedisError as exc:
                log.warning("supervisor: redis unavailable: %s", exc)
            except Exception:
                log.exception("supervisor tick failed")
            expected = time.monotonic() + interval

    def _tick(self, late_s: float = 0.0) -> None:
        """One scan. It waits for nothing but Redis (one pipelined renewal, one pipelined read,
        a few single calls): leaving rooms happens on the leaving threads."""
        s = self.settings
        now = time.monotonic()
        # every lease due is renewed in one round trip, so hundreds of sessions cost one call;
        # with the epoch: a lease that ran out during a Redis outage and that nobody took
        # meanwhile comes back to this owner, which resumes where it was
        due = [(cid, session) for cid, session in list(self.sessions.items())
               if now - session.renewed_at >= s.lease_ttl_s / 3]
        requested = time.monotonic()
        held = self.store.renew_leases([(cid, se.token, se.epoch) for cid, se in due], s.lease_ttl_s) if due else []
        for (cid, session), ok in zip(due, held, strict=True):
            if not ok:
                step(log, "lease.lost", logging.WARNING, conversation=cid, worker=self.hostname)
                self.drop(cid, "lease lost", release=False, wait=False)
                continue
            session.renewed_at = requested
            session.fence.renewed(requested)
        # each held conversation's backlog and state, in one round trip
        held_now = list(self.sessions.items())
        states = self.store.supervision([cid for cid, _ in held_now]) if held_now else []
        for (cid, session), (backlog, state) in zip(held_now, states, strict=True):
            if self.sessions.get(cid) is not session:  # let go meanwhile
                continue
            metrics.backlog(cid, backlog)
            if state == "closing" and backlog == 0 and not session.draining:
                self._close_now(cid, wait=False)
            elif backlog and not session.draining and not self.shutting_down and session.shedding is None:
                session.unanswered += 1
                if session.unanswered >= 3:
                    # three rings and nobody drained: the broker is away or Celery is still
                    # reconnecting to it (its back-off grows to many seconds after a Redis
                    # restart); Redis answers again, so drain from here rather than wait
                    session.unanswered = 0
                    self._drains.submit(self._drain_here, cid)
                else:
                    self.ring(cid)
            else:
                session.unanswered = 0
        self._shed(now, late_s)
        # after the renewals above, so that a long log to walk never delays them
        for cid, (closed_at, url) in list(self._closed_at.items()):
            if now - closed_at >= retention.SECOND_PASS_LEASES * s.lease_ttl_s:
                retention.expire_conversation(self.redis, cid, s.retention_s, url)
                del self._closed_at[cid]
        for cid, shed_at in list(self._shed_at.items()):
            if now - shed_at >= s.shed_cooldown_s:
                del self._shed_at[cid]
        limit = self.limit_now(now)
        self.redis.hset(keys.WORKERS, self.hostname, json.dumps(
            {"sessions": sorted(self.sessions), "ts": time.time(), "max_sessions": limit,
             "threads": self.threads, "shutting_down": self.shutting_down, "shedding": now < self._shed_until}))
        if self.shutting_down or len(self.sessions) >= limit:
            self._note_waiting()
            return
        free = set()
        metrics.conversations_waiting(0)  # this worker has room: it takes any free one below
        candidates = [cid for cid in self.store.open_conversations()
                      if cid not in self.sessions and cid not in self._adopting and cid not in self._leaving
                      and self._retry_at.get(cid, 0) <= now and not self._shed_lately(cid, now)]
        for cid in self.waiting.unowned(candidates):  # one round trip for every lease
            if not self._closed_unjoined(cid, self.store.conversation(cid) or {}):
                free.add(cid)
                # free on two scans at least two intervals apart: after a Redis outage every lease
                # has run out at once, and the owner (which renews on its first scan back) keeps
                # its conversations instead of losing them to a race it would often lose
                if now - self._free_since.setdefault(cid, now) >= 2 * s.scan_interval_s:
                    self._free_since.pop(cid, None)
                    self._pool.submit(self.adopt, cid)
        for cid in set(self._free_since) - free:
            del self._free_since[cid]

    # shedding ------------------------------------------------------------------------------

    def _shed(self, now: float, late_s: float) -> None:
        """Let go of the conversations chosen before once their senders are between two
        utterances; when this worker cannot keep up, adopt nothing for the cooldown and choose
        one more (at most one per lease TTL, never the last one held)."""
        s = self.settings
        if self.shutting_down:  # every conversation is being handed back already
            return
        for cid, session in list(self.sessions.items()):
            if session.shedding is not None:
                self._let_go(cid, session, now)
        reason = self._cannot_keep_up(now, late_s)
        if reason is None:
            return
        self._shed_until = now + s.shed_cooldown_s
        keeping = [se for se in list(self.sessions.values()) if se.shedding is None]
        if len(keeping) <= 1 or now - self._last_shed < s.lease_ttl_s:
            return
        # the most recently adopted, an idle one before one that is sending
        victim = max(keeping, key=lambda se: (not se.draining, se.taken_at))
        victim.shedding = reason
        self._last_shed = now
        step(log, "worker.overloaded", logging.WARNING, worker=self.hostname, reason=reason, sessions=len(keeping),
             shedding=victim.cid)
        self._let_go(victim.cid, victim, now)

    def _cannot_keep_up(self, now: float, late_s: float) -> str | None:
        """Why this worker cannot keep up, or None when it can (see the module doc)."""
        s = self.settings
        if s.shed_late_fraction and late_s > s.shed_late_fraction * s.lease_ttl_s:
            self._late_scans += 1
            if self._late_scans >= LATE_SCANS:
                return f"supervisor scans woke up to {late_s:.2f} s late"
        else:
            self._late_scans = 0
        if not s.shed_late_chunks:
            return None
        behind = realtime = 0
        for session in list(self.sessions.values()):
            if not capacity.paces_in_real_time(s, session.mode):
                continue
            realtime += 1
            since, count = session.late_mark
            late = session.sender.pacer.late
            if now - since >= s.lease_ttl_s:  # one verdict per lease TTL
                session.behind = late - count >= s.shed_late_chunks
                session.late_mark = (now, late)
            behind += session.behind
        if behind >= 2 and 2 * behind >= realtime:
            return f"{behind} of {realtime} real-time conversations fell behind real time"
        return None

    def _let_go(self, cid: str, session: Session, now: float) -> None:
        """Shed ``session`` if its sender is idle (between two utterances); else the next scan tries."""
        if not session.lock.acquire(blocking=False):
            return
        try:
            if self._detach(cid, session) is None:
                return
        finally:
            session.lock.release()
        self._shed_at[cid] = now
        reason = session.shedding or "could not keep up"
        self.store.add_event(cid, {"type": "conversation.shed", "worker": self.hostname, "reason": reason})
        metrics.conversation_shed()
        step(log, "conversation.shed", logging.WARNING, conversation=cid, worker=self.hostname, reason=reason)
        # its sender is stopped and was idle, so nothing more goes out: the lease goes now, and
        # another worker takes the conversation at its next scans while this one leaves the room
        try:
            self.store.release_lease(cid, session.token)
        finally:
            self._leave_later(cid, session, "shed", False, None)

    def _note_waiting(self) -> None:
        """This worker is full: when no live worker has room, mark the unowned conversations
        waiting (each once, with the reason) so that nobody wonders why they are silent."""
        reason = capacity.fleet(self.redis, self.settings).waiting_reason
        if reason is None:  # another worker has room and takes them on its next scan
            metrics.conversations_waiting(0)
            return
        unowned = self.waiting.unowned(self.store.open_conversations())
        metrics.conversations_waiting(len(unowned))
        for cid in unowned:
            if self.waiting.mark(cid, reason):
                step(log, "conversation.waiting", logging.WARNING, conversation=cid, reason=reason)

    # room events ---------------------------------------------------------------------------

    def _handle_events(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                return
            cid, event = item
            try:
                self._on_room_event(cid, event)
            except Exception:
                log.exception("room event from %s not recorded", cid)

    def _on_room_event(self, cid: str, event: dict[str, Any]) -> None:
        etype = event.get("event_type")
        if etype in (REPLICA_LEFT, REPLICA_JOINED):
            self._on_presence(cid, etype == REPLICA_JOINED)
            return
        props = event.get("properties") or {}
        if not isinstance(props, dict):
            props = {}
        role = props.get("role")
        if role not in (None, "replica"):
            return
        inference_id = event.get("inference_id") or props.get("inference_id")
        if self._seen_before(cid, etype, inference_id, event.get("turn_idx")):
            return
        uid = self.store.utterance_for_inference(inference_id) if inference_id else None
        record: dict[str, Any] = {"type": f"replica.{str(etype).rsplit('.', 1)[-1]}", "inference_id": inference_id,
                                  "utterance_id": uid, "seq": event.get("seq")}
        if etype in SPEAKING_STARTED and uid:
            self.store.update_utterance(uid, spoken_started_at=f"{time.time():.6f}")
        elif etype in SPEAKING_STOPPED and uid:
            interrupted = bool(props.get("interrupted"))
            record.update(duration=props.get("duration"), interrupted=interrupted)
            state = self.store.mark_spoken(uid, "interrupted" if interrupted else "spoken", props.get("duration"))
            if state in ("spoken", "interrupted"):
                metrics.utterance_finished(state)
            step(log, "utterance.spoken", conversation=cid, utterance=uid, duration=props.get("duration"),
                 interrupted=interrupted)
        elif etype not in SPEAKING_STARTED | SPEAKING_STOPPED:
            record["event_type"] = etype
        self.store.add_event(cid, record)


    def _seen_before(self, cid: str, etype: Any, inference_id: Any, turn_idx: Any) -> bool:
        """Whether this start or stop was handled already: Tavus fires its role-based and its
        replica events in parallel, so one stop can arrive twice, once of each kind."""
        kind = "started" if etype in SPEAKING_STARTED else "stopped" if etype in SPEAKING_STOPPED else None
        ident = inference_id or (f"turn:{turn_idx}" if turn_idx is not None else None)
        if kind is None or ident is None:
            return False
        key = (cid, kind, str(ident))
        if key in self._seen:
            return True
        self._seen[key] = None
        while len(self._seen) > _SEEN_EVENTS:
            self._seen.popitem(last=False)
        return False

    def _on_presence(self, cid: str, present: bool) -> None:
        """The replica left the room (delivery waits for it) or is back (delivery goes on)."""
        self.store.set_conversation_fields(cid, replica="present" if present else "absent")
        self.store.add_event(cid, {"type": "replica.joined" if present else "replica.left"})
        step(log, "replica.joined" if present else "replica.left", logging.INFO if present else logging.WARNING,
             conversation=cid)


_manager: SessionManager | None = None


def manager() -> SessionManager:
    """This process's session manager (created when the worker is ready)."""
    if _manager is None:
        raise PermanentError("no session manager in this process: sessions live in `echoq worker` processes")
    return _manager


def install(factory: Callable[[], SessionManager]) -> SessionManager:
    global _manager
    if _manager is None:
        _manager = factory()
        _manager.start()
    return _manager
