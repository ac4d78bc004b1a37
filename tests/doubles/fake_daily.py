"""An in-memory stand-in for the ``daily`` package, built from what daily-python 0.36 was seen doing.

Every behaviour below was observed with the real module (``scripts/probe_daily.py`` prints it;
``tests/doubles/daily_shapes.json`` holds what it printed and ``tests/unit/test_fake_daily.py``
runs the same probe against this double and compares):

- Every call returns at once; its completion, like every event, runs later on one SDK thread,
  in call order. Calls on one client run in order: a ``leave`` made while a join is pending
  takes effect after it, and ``release`` blocks until it is over.
- ``on_error(message)`` fires for single failed requests, not only for a lost call: a send
  before join completes with ``'AppMessage(Signalling(ChannelNotOpen))'`` and then fires
  ``on_error('Error handling sendAppMessage: …')``; a failing send while joined does the same.
- A failed join fires ``on_error(<room lookup message>)`` -> state ``leaving`` -> ``left`` ->
  completion ``(None, <error>)`` -> ``on_error('Error handling join: <error>')``, with no
  ``joining``. ``leave()`` afterwards (or before any join) fires ``leaving``, completes with
  ``(None,)``, then fires ``left``.
- After ``release()``, a second ``release()`` or any other call raises
  ``RuntimeError('this object has already been released')``.
- ``send_app_message(message, participant_id=None, completion=None)``: no ``serialize_none``.
- ``Daily.create_microphone_device`` accepts a duplicate name; its ``write_frames`` does not
  block and writes nothing (returns 0) unless the device is live in a call.
- ``CustomAudioSource(sample_rate, channels, auto_silence=True).write_frames(frames)`` blocks for
  as long as the audio lasts (padded up to a whole 10 ms) and returns the frames written, also
  before the track is published; ``CustomAudioTrack(source).id`` is a uuid;
  ``add_custom_audio_track(name, track, ignore_audio_level=None, completion=None)`` completes
  with ``None``.

Where the real SDK aborts the process (a second ``Daily.init()``, a ``CallClient`` before
``init``, ``deinit()`` with a live client) the double raises a :class:`FakeDailyAbort` subclass
instead, so a test can prove the code never does it. A client call made from the SDK thread
(from inside a callback) is recorded in ``violations`` and refused: with the real SDK it can
deadlock.

Test controls: ``join_delay_s``, ``join_gate`` and ``join_error`` (a slow or failing join),
``send_errors`` (one error string or None per send, in order), ``hold_sends`` (completions never
come), ``audio_speed`` (how much faster than real time custom audio sources play),
``short_writes`` (frame counts a custom source returns instead of the full count),
:meth:`FakeDaily.add_participant` / :meth:`FakeDaily.remove_participant`,
:meth:`FakeDaily.app_message_from`, :meth:`FakeDaily.drop_connection`, :meth:`FakeDaily.drain`.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

CHANNEL_NOT_OPEN = "AppMessage(Signalling(ChannelNotOpen))"
#: The SDK's own words for a request that failed: ``on_error`` gets them for every failed send or join.
SEND_ERROR_PREFIX = "Error handling sendAppMessage: "
JOIN_ERROR_PREFIX = "Error handling join: "
#: ``on_error`` first fired by a join whose room lookup fails (offline).
ROOM_LOOKUP_FAILED = "Failed to fetch room information: GET failed: client error (Connect)"
#: The completion error of that join (daily-python 0.36 offline, address details cut).
OFFLINE_JOIN_ERROR = "Connection(Api(RoomLookup(RoomInfoFetchFailed(Get(hyper_util::client::legacy::Error(Connect, ...))))))"
RELEASED = "this object has already been released"


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
    """Base class of event handlers; every event is a no-op unless overridden (0.36 names)."""

    def on_app_message(self, message: Any, sender: str) -> None: ...
    def on_call_state_updated(self, state: str) -> None: ...
    def on_error(self, message: str) -> None: ...
    def on_network_connection_status_updated(self, status: Mapping[str, Any]) -> None: ...
    def on_network_stats_updated(self, stats: Mapping[str, Any]) -> None: ...
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
    """A virtual microphone device: never live in a call here, so it writes nothing."""

    name: str
    sample_rate: int
    channels: int
    non_blocking: bool
    calls: int = 0

    def write_frames(self, frame: bytes, completion: Callable[[int], None] | None = None) -> int:
        self.calls += 1
        return 0


@dataclass
class FakeAudioSource:
    """``CustomAudioSource``: blocking writes paced at real time (``audio_speed`` faster)."""

    fake: FakeDaily
    sample_rate: int
    channels: int
    auto_silence: bool = True
    written: list[bytes] = field(default_factory=list)

    def write_frames(self, frame: bytes, completion: Callable[[int], None] | None = None) -> int:
        frames = len(frame) // (2 * self.channels)
        with self.fake.lock:
            short = self.fake.short_writes.popleft() if self.fake.short_writes else None
        if short is not None:
            frames = min(frames, short)
        data = bytes(frame[: frames * 2 * self.channels])
        self.written.append(data)
        # The SDK pads a write up to a whole 10 ms and takes as long as that lasts.
        seconds = math.ceil(frames * 100 / self.sample_rate) / 100
        if self.fake.audio_speed > 0:
            time.sleep(seconds / self.fake.audio_speed)
        if completion is not None:
            self.fake._sdk.post(lambda: completion(frames))
        return frames


class FakeAudioTrack:
    """``CustomAudioTrack``: an id and the source it plays."""

    def __init__(self, source: FakeAudioSource) -> None:
        self.source = source
        self.id = str(uuid.uuid4())


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
            if not fake.initialised:  # the real SDK segfaults
                raise NotInitialised("create_microphone_device before Daily.init()")
            mic = FakeMicrophone(device_name, sample_rate, channels, non_blocking)
            fake.microphones.append(mic)  # a duplicate name is accepted, as by the SDK
            return mic


class FakeCallClient:
    """One call client; its state and everything sent through it are public for assertions."""

    def __init__(self, fake: FakeDaily, event_handler: Any) -> None:
        self._fake = fake
        self.handler = event_handler
        self.state = "initialized"
        self.released = False
        self.local_id = f"local-{next(fake._ids)}"
        self.user_name: str | None = None
        self.join_args: dict[str, Any] = {}
        self.sent: list[Any] = []
        self.completion_threads: list[str] = []
        self.inputs_updates: list[Mapping[str, Any]] = []
        self.publishing_updates: list[Mapping[str, Any]] = []
        self.custom_tracks: dict[str, FakeAudioTrack] = {}
        self.leave_calls = 0
        self._join_done = threading.Event()
        self._join_done.set()
        self._deferred_leave: tuple[Callable[..., None] | None] | None = None

    # -- plumbing -----------------------------------------------------------------------------

    def _guard(self, name: str) -> None:
        if self.released:
            raise RuntimeError(RELEASED)
        if threading.current_thread() is self._fake._sdk.thread:
            self._fake.violations.append(name)
            raise ReentrantCall(f"CallClient.{name} called from the SDK thread")

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
            if not self.released and self.handler is not None:
                getattr(self.handler, name)(*args)

        self._fake._sdk.post(run)

    def _set_state(self, state: str) -> None:
        self.state = state
        self._event("on_call_state_updated", state)

    # -- the CallClient API used by echoq -------------------------------------------------------

    def set_user_name(self, user_name: str) -> None:
        self._guard("set_user_name")
        self.user_name = user_name

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
            # The observed order: no "joining", the room lookup error, leaving, left, the
            # completion, then on_error for the join request itself.
            self._event("on_error", ROOM_LOOKUP_FAILED)
            self._set_state("leaving")
            self._set_state("left")
            self._complete(completion, None, error)
            self._event("on_error", JOIN_ERROR_PREFIX + error)
        else:
            self._set_state("joining")
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
        return {"id": self.local_id, "info": {"isLocal": True, "userName": self.user_name or ""}}

    def leave(self, completion: Callable[..., None] | None = None) -> None:
        self._guard("leave")
        self.leave_calls += 1
        with self._fake.lock:
            if not self._join_done.is_set():
                # Calls on one client run in order: this leave waits for the pending join.
                self._deferred_leave = (completion,)
                return
        self._do_leave(completion)

    def _do_leave(self, completion: Callable[..., None] | None) -> None:
        with self._fake.lock:
            if self in self._fake.joined_clients:
                self._fake.joined_clients.remove(self)
        self._set_state("leaving")
        self._complete(completion, None)  # one argument: ``(None,)``, joined or not
        self._set_state("left")

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
        completion: Callable[[str | None], None] | None = None,
    ) -> None:
        self._guard("send_app_message")
        fake = self._fake
        if self.state != "joined":
            error: str | None = CHANNEL_NOT_OPEN
            hold = False
        else:
            with fake.lock:
                error = fake.send_errors.popleft() if fake.send_errors else None
                hold = fake.hold_sends
            if error is None:
                self.sent.append(message)
                fake.sent.append(message)
        if hold:
            return
        self._complete(completion, error)
        if error:
            self._event("on_error", SEND_ERROR_PREFIX + error)

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

    def add_custom_audio_track(
        self,
        track_name: str,
        audio_track: FakeAudioTrack,
        ignore_audio_level: bool | None = None,
        completion: Callable[[str | None], None] | None = None,
    ) -> None:
        self._guard("add_custom_audio_track")
        self.custom_tracks[track_name] = audio_track
        self._complete(completion, None)

    def remove_custom_audio_track(
        self, track_name: str, completion: Callable[[str | None], None] | None = None
    ) -> None:
        self._guard("remove_custom_audio_track")
        self.custom_tracks.pop(track_name, None)
        self._complete(completion, None)


class FakeDaily:
    """One process's worth of fake ``daily``: ``Daily``, ``CallClient``, ``EventHandler``,
    ``CustomAudioSource`` and ``CustomAudioTrack``."""

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
        self.microphones: list[FakeMicrophone] = []
        self.sources: list[FakeAudioSource] = []
        self.violations: list[str] = []
        self.dropped_after_release = 0
        # Knobs
        self.join_delay_s = 0.0
        self.join_gate = threading.Event()  # cleared: joins wait until a test sets it
        self.join_gate.set()
        self.join_error: str | None = None
        self.send_errors: deque[str | None] = deque()
        self.hold_sends = False
        self.audio_speed = 1.0  # 0: custom audio writes return at once
        self.short_writes: deque[int] = deque()

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

    def CustomAudioSource(self, sample_rate: int, channels: int, auto_silence: bool = True) -> FakeAudioSource:  # noqa: N802
        source = FakeAudioSource(self, sample_rate, channels, auto_silence)
        with self.lock:
            self.sources.append(source)
        return source

    def CustomAudioTrack(self, audio_source: FakeAudioSource) -> FakeAudioTrack:  # noqa: N802
        return FakeAudioTrack(audio_source)

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
