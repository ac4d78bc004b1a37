"""An in-memory stand-in for the ``daily`` package, behaving as PROTOCOL.md says daily-python does.

One :class:`FakeDaily` is one "process" worth of SDK: pass it as ``daily_module``. Like the real
SDK, every call returns at once and its completion, like every event, runs later on one separate
SDK thread, in call order. Where the real SDK aborts the process (a second ``Daily.init()``, a
``CallClient`` before ``init``, ``deinit()`` with a live client) the double raises a
:class:`FakeDailyAbort` subclass instead, so a test can prove the code never does it. A client
call made from the SDK thread (from inside a callback) is recorded in ``violations`` and refused,
because with the real SDK it can deadlock.

Calls on one client run in order: a ``leave`` made while a slow join is pending takes effect
after it, and ``release`` blocks until it is over, as observed with daily-python offline.

Test controls: ``join_delay_s``, ``join_gate`` and ``join_error`` (a slow failing join), ``send_errors`` (one
error string or None per send, in order), ``hold_sends`` (completions never come),
:meth:`FakeDaily.add_participant` / :meth:`FakeDaily.remove_participant`,
:meth:`FakeDaily.app_message_from`, :meth:`FakeDaily.drop_connection`, :meth:`FakeDaily.drain`.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

CHANNEL_NOT_OPEN = "AppMessage(Signalling(ChannelNotOpen))"


class FakeDailyAbort(RuntimeError):
    """Something that aborts the process with the real SDK."""


class DoubleInit(FakeDailyAbort):
    """``Daily.init()`` called a second time in one process."""


class NotInitialised(FakeDailyAbort):
    """A ``CallClient`` (or device) made before ``Daily.init()``."""


class DeinitWithLiveClients(FakeDailyAbort):
    """``Daily.deinit()`` while a client is not released."""


class ReentrantCall(RuntimeError):
    """A client method called from the SDK thread, i.e. from inside a callback."""


class EventHandler:
    """Base class of event handlers; every event is a no-op unless overridden."""

    def on_app_message(self, message: Any, sender: str) -> None: ...
    def on_call_state_updated(self, state: str) -> None: ...
    def on_error(self, message: str) -> None: ...
    def on_network_connection_status_updated(self, status: Mapping[str, Any]) -> None: ...
    def on_participant_joined(self, participant: Mapping[str, Any]) -> None: ...
    def on_participant_left(self, participant: Mapping[str, Any], reason: str) -> None: ...
    def on_participant_updated(self, participant: Mapping[str, Any]) -> None: ...


class _SdkThread:
    """The one thread on which every completion and event runs, in the order they were queued."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="fake-daily-sdk", daemon=True)
        self.errors: list[BaseException] = []
        self.thread.start()

    def post(self, fn: Callable[[], None]) -> None:
        self._queue.put(fn)

    def drain(self) -> None:
        self._queue.join()

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            fn = self._queue.get()
            try:
                if fn is None:
                    return
                fn()
            except BaseException as exc:  # recorded: a callback that raises is a bug under test
                self.errors.append(exc)
            finally:
                self._queue.task_done()


@dataclass
class FakeMicrophone:
    """A virtual microphone; ``frames`` holds every buffer written to it."""

    name: str
    sample_rate: int
    channels: int
    non_blocking: bool
    frames: list[bytes] = field(default_factory=list)

    def write_frames(self, frame: bytes, completion: Callable[[int], None] | None = None) -> int:
        self.frames.append(bytes(frame))
        return len(frame) // (2 * self.channels)


class _Daily:
    """The ``daily.Daily`` static class of one fake process."""

    def __init__(self, fake: FakeDaily) -> None:
        self._fake = fake

    def init(self, worker_threads: int = 2, log_level: Any = None) -> None:
        fake = self._fake
        with fake.lock:
            fake.init_calls += 1
            if fake.initialised:
                raise DoubleInit("Daily.init() called twice in one process")
            fake.initialised = True
            fake.init_thread = threading.current_thread().name

    def deinit(self) -> None:
        fake = self._fake
        with fake.lock:
            if any(not c.released for c in fake.clients):
                raise DeinitWithLiveClients("Daily.deinit() with a live CallClient")
            fake.initialised = False

    def create_microphone_device(
        self, device_name: str, sample_rate: int = 16000, channels: int = 1, non_blocking: bool = False
    ) -> FakeMicrophone:
        fake = self._fake
        with fake.lock:
            if not fake.initialised:
                raise NotInitialised("create_microphone_device before Daily.init()")
            if device_name in fake.microphones:
                raise ValueError(f"a device named {device_name!r} exists")
            mic = FakeMicrophone(device_name, sample_rate, channels, non_blocking)
            fake.microphones[device_name] = mic
            return mic


class FakeCallClient:
    """One call client; its state and everything sent through it are public for assertions."""

    def __init__(self, fake: FakeDaily, event_handler: Any) -> None:
        self._fake = fake
        self.handler = event_handler
        self.state = "initialized"
        self.released = False
        self.local_id = f"local-{next(fake._ids)}"
        self.join_args: dict[str, Any] = {}
        self.sent: list[Any] = []
        self.completion_threads: list[str] = []
        self.inputs_updates: list[Mapping[str, Any]] = []
        self.publishing_updates: list[Mapping[str, Any]] = []
        self.leave_calls = 0
        self._join_done = threading.Event()
        self._join_done.set()
        self._deferred_leave: tuple[Callable[[str | None], None] | None] | None = None

    # -- plumbing -----------------------------------------------------------------------------

    def _guard(self, name: str) -> None:
        if threading.current_thread() is self._fake._sdk.thread:
            self._fake.violations.append(name)
            raise ReentrantCall(f"CallClient.{name} called from the SDK thread")
        if self.released and name != "release":
            raise RuntimeError(f"CallClient.{name} after release")

    def _complete(self, completion: Callable[..., None] | None, *args: Any) -> None:
        if completion is None:
            return

        def run() -> None:
            if self.released:
                self._fake.dropped_after_release += 1
                return
            self.completion_threads.append(threading.current_thread().name)
            completion(*args)

        self._fake._sdk.post(run)

    def _event(self, name: str, *args: Any) -> None:
        def run() -> None:
            if not self.released:
                getattr(self.handler, name)(*args)

        self._fake._sdk.post(run)

    def _set_state(self, state: str) -> None:
        self.state = state
        self._event("on_call_state_updated", state)

    # -- the CallClient API used by echoq -------------------------------------------------------

    def join(
        self,
        meeting_url: str,
        meeting_token: str | None = None,
        client_settings: Mapping[str, Any] | None = None,
        completion: Callable[[Mapping[str, Any] | None, str | None], None] | None = None,
    ) -> None:
        self._guard("join")
        fake = self._fake
        self.join_args = {
            "meeting_url": meeting_url,
            "meeting_token": meeting_token,
            "client_settings": client_settings,
        }
        self._join_done.clear()
        self._set_state("joining")
        if fake.join_delay_s > 0 or not fake.join_gate.is_set():
            # A slow join: it finishes on another thread once the gate is open and the delay
            # has passed; until then this client's later calls wait behind it.
            def pending() -> None:
                fake.join_gate.wait()
                if fake.join_delay_s > 0:
                    fake._closing.wait(fake.join_delay_s)
                self._finish_join(completion, fake.join_error)

            threading.Thread(target=pending, name="fake-daily-slow-join", daemon=True).start()
            return
        self._finish_join(completion, fake.join_error)

    def _finish_join(self, completion: Callable[..., None] | None, error: str | None) -> None:
        fake = self._fake
        if error:
            self._set_state("left")
            self._complete(completion, None, error)
        else:
            with fake.lock:
                self.state = "joined"
                fake.joined_clients.append(self)
                participants = {"local": self._local_info(), **{p: dict(i) for p, i in fake.room.items()}}
            self._event("on_call_state_updated", "joined")
            self._complete(
                completion, {"meetingSession": {"id": "session-1"}, "participants": participants}, None
            )
        self._join_done.set()
        deferred, self._deferred_leave = self._deferred_leave, None
        if deferred is not None:
            self._do_leave(deferred[0])

    def _local_info(self) -> dict[str, Any]:
        return {"id": self.local_id, "info": {"isLocal": True, "userName": "echoq"}}

    def leave(self, completion: Callable[[str | None], None] | None = None) -> None:
        self._guard("leave")
        self.leave_calls += 1
        with self._fake.lock:
            if not self._join_done.is_set():
                # Calls on one client run in order: this leave waits for the pending join.
                self._deferred_leave = (completion,)
                return
        self._do_leave(completion)

    def _do_leave(self, completion: Callable[[str | None], None] | None) -> None:
        with self._fake.lock:
            if self in self._fake.joined_clients:
                self._fake.joined_clients.remove(self)
        was = self.state
        self._set_state("leaving")
        self._set_state("left")
        self._complete(completion, None if was in ("joined", "joining") else "not joined")

    def release(self) -> None:
        self._guard("release")
        # Like the SDK, release blocks until the client's pending calls (a slow join) are over.
        self._join_done.wait()
        with self._fake.lock:
            if self in self._fake.joined_clients:
                self._fake.joined_clients.remove(self)
        self.released = True

    def participants(self) -> Mapping[str, Any]:
        self._guard("participants")
        with self._fake.lock:
            room = {p: dict(i) for p, i in self._fake.room.items()} if self.state == "joined" else {}
        return {"local": self._local_info(), **room}

    def send_app_message(
        self,
        message: Any,
        participant_id: str | None = None,
        serialize_none: bool = True,
        completion: Callable[[str | None], None] | None = None,
    ) -> None:
        self._guard("send_app_message")
        fake = self._fake
        if self.state != "joined":
            self._complete(completion, CHANNEL_NOT_OPEN)
            return
        with fake.lock:
            error = fake.send_errors.popleft() if fake.send_errors else None
            hold = fake.hold_sends
        if error is None:
            self.sent.append(message)
            fake.sent.append(message)
        if not hold:
            self._complete(completion, error)

    def update_inputs(
        self, input_settings: Mapping[str, Any], completion: Callable[[str | None], None] | None = None
    ) -> None:
        self._guard("update_inputs")
        self.inputs_updates.append(input_settings)
        self._complete(completion, None)

    def update_publishing(
        self, publishing_settings: Mapping[str, Any], completion: Callable[[str | None], None] | None = None
    ) -> None:
        self._guard("update_publishing")
        self.publishing_updates.append(publishing_settings)
        self._complete(completion, None)


class FakeDaily:
    """One process's worth of fake ``daily``: ``Daily``, ``CallClient``, ``EventHandler``."""

    EventHandler = EventHandler

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.Daily = _Daily(self)
        self._sdk = _SdkThread()
        self._ids = itertools.count(1)
        self._closing = threading.Event()
        # State and records
        self.initialised = False
        self.init_calls = 0
        self.init_thread: str | None = None
        self.clients: list[FakeCallClient] = []
        self.joined_clients: list[FakeCallClient] = []
        self.room: dict[str, dict[str, Any]] = {}
        self.sent: list[Any] = []
        self.microphones: dict[str, FakeMicrophone] = {}
        self.violations: list[str] = []
        self.dropped_after_release = 0
        # Knobs
        self.join_delay_s = 0.0
        self.join_gate = threading.Event()  # cleared: joins wait until a test sets it
        self.join_gate.set()
        self.join_error: str | None = None
        self.send_errors: deque[str | None] = deque()
        self.hold_sends = False

    @property
    def sdk_thread_name(self) -> str:
        return self._sdk.thread.name

    @property
    def callback_errors(self) -> list[BaseException]:
        """Exceptions raised by callbacks on the SDK thread (should stay empty)."""
        return self._sdk.errors

    def CallClient(self, event_handler: Any = None) -> FakeCallClient:  # noqa: N802 - mirrors daily
        with self.lock:
            if not self.initialised:
                raise NotInitialised("CallClient created before Daily.init()")
            client = FakeCallClient(self, event_handler)
            self.clients.append(client)
            return client

    # -- test controls ------------------------------------------------------------------------

    def drain(self) -> None:
        """Wait until every completion and event queued so far has run on the SDK thread."""
        self._sdk.drain()

    def add_participant(self, user_name: str = "replica", participant_id: str | None = None) -> str:
        """A remote participant joins: every joined client gets ``on_participant_joined``."""
        pid = participant_id or f"remote-{next(self._ids)}"
        info = {"id": pid, "info": {"isLocal": False, "userName": user_name}}
        with self.lock:
            self.room[pid] = info
            clients = list(self.joined_clients)
        for client in clients:
            client._event("on_participant_joined", dict(info))
        return pid

    def remove_participant(self, participant_id: str) -> None:
        """A remote participant leaves: ``on_participant_left(participant, "leftCall")``."""
        with self.lock:
            info = self.room.pop(participant_id)
            clients = list(self.joined_clients)
        for client in clients:
            client._event("on_participant_left", dict(info), "leftCall")

    def app_message_from(self, participant_id: str, message: Any) -> None:
        """A remote participant sends an app message to every joined client."""
        with self.lock:
            clients = list(self.joined_clients)
        for client in clients:
            client._event("on_app_message", message, participant_id)

    def drop_connection(self) -> None:
        """The network goes: every joined client moves to ``left`` (``on_call_state_updated``)."""
        with self.lock:
            clients = list(self.joined_clients)
            self.joined_clients.clear()
        for client in clients:
            client._set_state("left")

    def finish_pending_joins(self) -> None:
        """Let every slow join finish now (with ``join_error`` if one is set)."""
        self._closing.set()
        self.join_gate.set()

    def close(self) -> None:
        """Finish any pending slow join, then stop the SDK thread."""
        self.finish_pending_joins()
        self._sdk.stop()
