"""Daily rooms through daily-python: the only module in echoq that imports ``daily``.

What the SDK does, and what this module does about it (PROTOCOL.md, Daily section):

- ``Daily.init()`` may run once per process, and never in a process that later forks: children
  forked after it hang. It runs here lazily, under a lock, on the first join, so importing this
  module (as the worker's parent does) never initialises the SDK.
- Every SDK call returns at once and reports through a completion callback on the SDK's own
  thread. Each call here turns that callback into a :class:`concurrent.futures.Future` and waits
  on it with its own timeout: an offline join fails only after 19–49 s otherwise.
- Callbacks and events run on the SDK thread while it holds the GIL. They only set futures,
  flags and conditions, or hand an app message to ``on_event``; they never block and never call
  the client back, which could deadlock the SDK thread against itself.
- Errors come back as strings such as ``'AppMessage(Signalling(ChannelNotOpen))'``; they are
  mapped to :mod:`worker.errors` types at this boundary.

A meeting token may ride in the URL's query (``?t=…``). It is passed to ``join`` as
``meeting_token``, and it never appears in a log line or an error message: rooms are named by
host and path only, and SDK error strings are scrubbed of it.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, quote_plus, urlencode, urlsplit, urlunsplit

from ..errors import ConfigError, InvalidInput, JoinFailed, ReplicaAbsent, RoomDisconnected, SendFailed
from ..logs import ms_since, step
from .base import EventHandler, Transport

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["DailyTransport", "shutdown_all", "wait_for_cleanup"]

log = logging.getLogger("echoq.daily")

#: How long ``leave`` waits for the SDK's completion before it releases the client anyway.
LEAVE_TIMEOUT_S = 5.0
#: The same wait for the client of a timed-out join, released in the background: its leave
#: queues behind the pending join, which the SDK may take up to ~50 s to give up on.
BACKGROUND_LEAVE_TIMEOUT_S = 60.0

#: Client settings for every join: the worker sends app messages, it has no camera and no mic
#: until microphone echo asks for one (see :meth:`DailyTransport.write_frames`).
CLIENT_SETTINGS: dict[str, Any] = {
    "inputs": {"camera": False, "microphone": False},
    "publishing": {"camera": {"isPublishing": False}, "microphone": {"isPublishing": False}},
}

# SDK error strings that mean "there is no usable call", as opposed to one failed message.
_DISCONNECTED = re.compile(r"channelnotopen|not ?joined|\bleft\b|\bleaving\b|disconnected", re.IGNORECASE)

# The query parameters of a Daily room URL that carry a meeting token.
_TOKEN_PARAMS = ("t", "token")


# ---------------------------------------------------------------------------------------------
# Process-wide SDK state


_sdk_lock = threading.Lock()
# The SDK modules ``Daily.init()`` has run for, with the pid it ran in. Normally one entry, the
# real ``daily``; tests inject doubles, each of which is its own "process".
_initialised: list[tuple[Any, int]] = []
_live: set[DailyTransport] = set()
_cleanups: set[threading.Thread] = set()
_mic_names = itertools.count(1)


def _import_daily() -> Any:
    try:
        return importlib.import_module("daily")
    except ImportError as exc:
        raise ConfigError(
            "daily-python is not installed; it is needed for https:// conversation URLs"
        ) from exc


def _ensure_init(sdk: Any) -> None:
    """``Daily.init()`` once per process for ``sdk``, refusing to touch it in a forked child."""
    with _sdk_lock:
        for module, pid in _initialised:
            if module is sdk:
                if pid != os.getpid():
                    # The SDK's threads did not survive the fork; any call would hang.
                    raise ConfigError(
                        "daily-python was initialised in a parent process and is not fork-safe; "
                        "run workers with the threads pool (-P threads)"
                    )
                return
        sdk.Daily.init()
        _initialised.append((sdk, os.getpid()))
        log.debug("daily initialised pid=%s", os.getpid())


def shutdown_all(timeout: float = 10.0) -> None:
    """Leave and release every live Daily client of this process (worker shutdown).

    Also waits up to ``timeout`` for releases still running in the background after joins that
    timed out.
    """
    with _sdk_lock:
        transports = list(_live)
    for transport in transports:
        try:
            transport.leave()
        except Exception:  # one stuck room must not keep the others from being released
            log.exception("leaving %s at shutdown failed", transport.room)
    if not wait_for_cleanup(timeout):
        log.warning("daily clients still being released after %.1fs at shutdown", timeout)


def wait_for_cleanup(timeout: float | None = None) -> bool:
    """Wait for background releases of timed-out joins; True when none is left running."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _sdk_lock:
            threads = list(_cleanups)
        if not threads:
            return True
        for thread in threads:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            thread.join(remaining)


def _close_client(client: Any, room: str, scrub: Callable[[str], str], leave_timeout: float) -> None:
    """``leave`` (waiting at most ``leave_timeout`` for its completion), then ``release``."""
    t0 = time.monotonic()
    left: Future[Any] = Future()
    try:
        client.leave(completion=lambda err: _settle(left, err))
        error = left.result(timeout=leave_timeout)
        if error:
            log.debug("leave reported %s room=%s", scrub(str(error)), room)
    except FutureTimeout:
        log.warning("leave of daily room %s got no answer within %.1fs; releasing", room, leave_timeout)
    except Exception as exc:
        log.warning("leave of daily room %s failed: %s", room, scrub(str(exc)))
    finally:
        try:
            client.release()
        except Exception as exc:
            log.warning("release of daily client for %s failed: %s", room, scrub(str(exc)))
    step(log, "daily.released", room=room, ms=ms_since(t0))


def _close_in_background(client: Any, room: str, scrub: Callable[[str], str]) -> None:
    """Leave and release ``client`` on a thread of its own.

    Calls on one client run in order, so a leave queued behind a join that is still pending
    answers only once the SDK gives up on that join (19–49 s offline), and ``release`` blocks
    until then. A timed-out join must not wait for that.
    """

    def run() -> None:
        try:
            _close_client(client, room, scrub, BACKGROUND_LEAVE_TIMEOUT_S)
        finally:
            with _sdk_lock:
                _cleanups.discard(threading.current_thread())

    thread = threading.Thread(target=run, name="echoq-daily-release", daemon=True)
    with _sdk_lock:
        _cleanups.add(thread)
    thread.start()


def _settle(future: Future[Any], value: Any) -> None:
    """Resolve ``future`` from an SDK callback; a late or repeated callback is ignored."""
    # InvalidStateError: resolved between the check and the set; the first answer wins.
    with contextlib.suppress(InvalidStateError):
        if not future.done():
            future.set_result(value)


# ---------------------------------------------------------------------------------------------
# URLs and secrets


def split_token(url: str) -> tuple[str, str | None]:
    """The room URL without its token parameter, and the meeting token if the URL had one."""
    parts = urlsplit(url)
    token = None
    kept = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in _TOKEN_PARAMS and value:
            token = value
        else:
            kept.append((key, value))
    if token is None:
        return url, None
    return urlunsplit(parts._replace(query=urlencode(kept))), token


def room_label(url: str) -> str:
    """``host/path`` of a room URL: what logs and errors call the room (no query, no token)."""
    parts = urlsplit(url)
    return f"{parts.netloc}{parts.path}"


# ---------------------------------------------------------------------------------------------
# One join's state, shared with the SDK thread


class _Session:
    """What one ``CallClient`` knows: whether the call is usable, who is in it.

    Every join makes a new session, so events that arrive late from a client that has been left
    land on its own, closed session and cannot mark the next join disconnected.
    """

    def __init__(self, transport: DailyTransport, client: Any) -> None:
        self.transport = transport
        self.client = client
        self.cond = threading.Condition()
        self.joined = False
        self.closed = False
        self.lost_reason: str | None = None
        self.remote: dict[str, Mapping[str, Any]] = {}
        self._gone: set[str] = set()

    @property
    def usable(self) -> bool:
        return self.joined and not self.closed and self.lost_reason is None

    def mark_joined(self, participants: Mapping[str, Any] | None) -> None:
        with self.cond:
            self.joined = True
            self._merge(participants)
            self.cond.notify_all()

    def merge_snapshot(self, participants: Mapping[str, Any] | None) -> None:
        with self.cond:
            self._merge(participants)
            self.cond.notify_all()

    def _merge(self, participants: Mapping[str, Any] | None) -> None:
        # A snapshot may be older than a participant_left already seen: never resurrect those.
        for key, info in (participants or {}).items():
            pid = _participant_id(key, info)
            if pid and pid not in self._gone and not _is_local(key, info):
                self.remote[pid] = info

    def mark_lost(self, reason: str) -> None:
        with self.cond:
            if self.lost_reason is None and not self.closed:
                self.lost_reason = reason
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def participant_joined(self, info: Mapping[str, Any]) -> None:
        pid = _participant_id(None, info)
        if not pid or _is_local(None, info):
            return
        with self.cond:
            self._gone.discard(pid)
            self.remote[pid] = info
            self.cond.notify_all()

    def participant_updated(self, info: Mapping[str, Any]) -> None:
        pid = _participant_id(None, info)
        with self.cond:
            if pid in self.remote:
                self.remote[pid] = info
                self.cond.notify_all()

    def participant_left(self, info: Mapping[str, Any]) -> None:
        pid = _participant_id(None, info)
        if not pid:
            return
        with self.cond:
            self._gone.add(pid)
            self.remote.pop(pid, None)
            self.cond.notify_all()


def _participant_id(key: str | None, info: Any) -> str | None:
    if isinstance(info, Mapping) and isinstance(info.get("id"), str):
        return info["id"]
    return key if key and key != "local" else None


def _is_local(key: str | None, info: Any) -> bool:
    if key == "local":
        return True
    details = info.get("info") if isinstance(info, Mapping) else None
    return bool(isinstance(details, Mapping) and details.get("isLocal"))


def _user_name(info: Mapping[str, Any]) -> str | None:
    details = info.get("info")
    name = details.get("userName") if isinstance(details, Mapping) else None
    return name if isinstance(name, str) else None


def _network_lost(status: Any) -> bool:
    """Whether an ``on_network_connection_status_updated`` payload says the connection broke."""
    if isinstance(status, Mapping):
        values = [status.get("event"), status.get("status"), status.get("state")]
    else:
        values = [status]
    return any(isinstance(v, str) and v.lower() in ("interrupted", "disconnected", "failed") for v in values)


# ---------------------------------------------------------------------------------------------
# Event handler


_handler_classes: list[tuple[Any, type]] = []


def _handler_class(sdk: Any) -> type:
    """A subclass of ``sdk.EventHandler``, made once per SDK module.

    Built at run time because ``daily`` is imported lazily (and tests pass a double); the SDK
    expects its handler to derive from its own ``EventHandler``.
    """
    with _sdk_lock:
        for module, cls in _handler_classes:
            if module is sdk:
                return cls
        cls = type("EchoqDailyHandler", (_HandlerMixin, sdk.EventHandler), {})
        _handler_classes.append((sdk, cls))
        return cls


class _HandlerMixin:
    """Events of one ``CallClient``.

    Every method runs on the SDK thread while it holds the GIL: it only updates the session
    (a short lock, never held while calling out) or hands an app message to ``on_event``. It
    never blocks and never calls the client, because the client's calls complete on this very
    thread and would wait on themselves.
    """

    session: _Session

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # The SDK's native base class takes no constructor arguments.
        return super().__new__(cls)

    def __init__(self, session: _Session) -> None:
        self.session = session

    def on_call_state_updated(self, state: str) -> None:
        if state in ("left", "error"):
            self.session.mark_lost(f"call state {state}")

    def on_network_connection_status_updated(self, status: Any) -> None:
        if _network_lost(status):
            self.session.mark_lost("network connection interrupted")

    def on_error(self, message: str) -> None:
        self.session.mark_lost(f"call error: {self.session.transport._scrub(str(message))}")

    def on_participant_joined(self, participant: Mapping[str, Any]) -> None:
        self.session.participant_joined(participant)

    def on_participant_updated(self, participant: Mapping[str, Any]) -> None:
        self.session.participant_updated(participant)

    def on_participant_left(self, participant: Mapping[str, Any], reason: str) -> None:
        self.session.participant_left(participant)

    def on_app_message(self, message: Any, sender: str) -> None:
        if self.session.closed:
            return
        if isinstance(message, str | bytes):
            try:
                message = json.loads(message)
            except ValueError:
                return
        if not isinstance(message, dict):
            return
        try:
            self.session.transport._emit(message)
        except Exception:  # a handler's bug must not escape into the SDK thread
            log.exception("daily event handler failed room=%s", self.session.transport.room)


# ---------------------------------------------------------------------------------------------
# The transport


class DailyTransport(Transport):
    """A Daily room held by one ``daily.CallClient``.

    ``daily_module`` replaces the ``daily`` package (tests pass the in-memory double); by default
    ``daily`` is imported on the first join.
    """

    def __init__(
        self,
        url: str,
        *,
        settings: Settings,
        on_event: EventHandler | None = None,
        daily_module: Any = None,
    ) -> None:
        super().__init__(url, on_event)
        self.settings = settings
        self.room = room_label(url)
        self._join_url, self._token = split_token(url)
        self._sdk = daily_module
        self._lock = threading.RLock()
        self._session: _Session | None = None
        # Virtual microphones by sample rate: the SDK offers no way to destroy one, so each is
        # made once per transport and reused across rejoins.
        self._mics: dict[int, Any] = {}
        self._mic_on: tuple[_Session, int] | None = None

    # -- helpers ------------------------------------------------------------------------------

    def _module(self) -> Any:
        if self._sdk is None:
            self._sdk = _import_daily()
        return self._sdk

    def _scrub(self, text: str) -> str:
        """``text`` with the meeting token blanked out (SDK errors may quote the URL)."""
        if self._token:
            for form in {self._token, quote(self._token, safe=""), quote_plus(self._token)}:
                text = text.replace(form, "***")
        return text

    def _usable_session(self) -> _Session:
        session = self._session
        if session is None or not session.joined or session.closed:
            raise RoomDisconnected(f"daily room {self.room} is not joined")
        if session.lost_reason is not None:
            raise RoomDisconnected(f"daily room {self.room} connection lost ({session.lost_reason})")
        return session

    def _call(self, what: str, start: Callable[[Future[Any]], None], timeout: float) -> Any:
        """Start one SDK call whose completion settles a future; wait for it up to ``timeout``."""
        future: Future[Any] = Future()
        start(future)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            raise SendFailed(
                f"{what} in daily room {self.room} got no answer within {timeout:.1f}s"
            ) from None

    # -- Transport ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        session = self._session
        return session is not None and session.usable

    def join(self, timeout: float) -> None:
        """Join the room; :class:`JoinFailed` when the SDK reports an error or ``timeout`` passes.

        On an SDK error the client is left and released before the error is raised. On a timeout
        the join is still pending inside the SDK, which holds the client until it gives up, so
        the client is left and released in the background and the error is raised at once.
        """
        with self._lock:
            if self._session is not None:
                self.leave()
            sdk = self._module()
            _ensure_init(sdk)
            t0 = time.monotonic()
            session = _Session(self, None)
            client = sdk.CallClient(event_handler=_handler_class(sdk)(session))
            session.client = client
            self._session = session
            with _sdk_lock:
                _live.add(self)
            done: Future[tuple[Any, Any]] = Future()
            try:
                client.join(
                    self._join_url,
                    meeting_token=self._token,
                    client_settings=CLIENT_SETTINGS,
                    completion=lambda data, error: _settle(done, (data, error)),
                )
                data, error = done.result(timeout=timeout)
            except FutureTimeout:
                self.leave(background=True)
                raise JoinFailed(f"join of daily room {self.room} timed out after {timeout:.1f}s") from None
            except Exception as exc:
                self.leave()
                raise JoinFailed(f"join of daily room {self.room} failed: {self._scrub(str(exc))}") from None
            if error:
                self.leave()
                raise JoinFailed(f"join of daily room {self.room} failed: {self._scrub(str(error))}")
            participants = data.get("participants") if isinstance(data, Mapping) else None
            session.mark_joined(participants if isinstance(participants, Mapping) else None)
            try:
                # Called here, on the caller's thread, never from an event handler.
                session.merge_snapshot(client.participants())
            except Exception:
                log.debug("participants() failed after join room=%s", self.room, exc_info=True)
            step(log, "daily.joined", room=self.room, remote=len(session.remote), ms=ms_since(t0))

    def wait_for_replica(self, timeout: float) -> None:
        """Block until the replica is in the room.

        The replica is the remote participant whose user name is ``settings.replica_user_name``,
        or any remote participant when that is unset. Raises :class:`ReplicaAbsent` after
        ``timeout`` and :class:`RoomDisconnected` if the call is lost meanwhile.
        """
        session = self._usable_session()
        deadline = time.monotonic() + timeout
        with session.cond:
            while not self._replica_present(session):
                if not session.usable:
                    reason = session.lost_reason or "left"
                    raise RoomDisconnected(
                        f"daily room {self.room} connection lost while waiting for the replica ({reason})"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    who = (
                        repr(self.settings.replica_user_name)
                        if self.settings.replica_user_name
                        else "any participant"
                    )
                    raise ReplicaAbsent(
                        f"replica ({who}) did not join daily room {self.room} within {timeout:.1f}s"
                    )
                session.cond.wait(remaining)

    def _replica_present(self, session: _Session) -> bool:
        wanted = self.settings.replica_user_name
        return any(wanted is None or _user_name(info) == wanted for info in session.remote.values())

    def send(self, message: dict[str, Any]) -> None:
        """Send one app message to everyone in the room; wait for the SDK to take it.

        Raises :class:`RoomDisconnected` when the call is not usable (before join, after a lost
        connection, or when the SDK says the channel is not open) and :class:`SendFailed` for any
        other SDK error or when no completion comes within ``settings.send_timeout_s``.
        """
        session = self._usable_session()
        error = self._call(
            "send",
            lambda fut: session.client.send_app_message(
                message, None, completion=lambda err: _settle(fut, err)
            ),
            self.settings.send_timeout_s,
        )
        if error:
            self._raise_send_error(session, str(error))

    def _raise_send_error(self, session: _Session, error: str) -> None:
        error = self._scrub(error)
        if _DISCONNECTED.search(error):
            # The call itself is unusable: every later send would fail the same way until a rejoin.
            session.mark_lost(error)
            raise RoomDisconnected(f"daily room {self.room} is not connected: {error}")
        raise SendFailed(f"send to daily room {self.room} failed: {error}")

    def write_frames(self, pcm: bytes, sample_rate: int) -> None:
        """Write s16le mono PCM to the room through a virtual microphone, at real-time pace.

        The first call on a join creates the microphone (one per sample rate) and switches the
        client's microphone input and publishing to it. Blocks for as long as the audio lasts.
        """
        if len(pcm) % 2:
            raise InvalidInput("pcm must be whole 16-bit samples (an even number of bytes)")
        session = self._usable_session()
        sdk = self._module()
        with self._lock:
            mic = self._mics.get(sample_rate)
            if mic is None:
                name = f"echoq-mic-{os.getpid()}-{next(_mic_names)}"
                mic = sdk.Daily.create_microphone_device(
                    name, sample_rate=sample_rate, channels=1, non_blocking=False
                )
                self._mics[sample_rate] = mic
            if self._mic_on != (session, sample_rate):
                self._enable_mic(session, mic.name)
                self._mic_on = (session, sample_rate)
        # Blocking write: the SDK paces it at real time, so it is done outside the lock.
        mic.write_frames(pcm)

    def _enable_mic(self, session: _Session, device_id: str) -> None:
        timeout = self.settings.send_timeout_s
        inputs = {"camera": False, "microphone": {"isEnabled": True, "settings": {"deviceId": device_id}}}
        error = self._call(
            "update_inputs",
            lambda fut: session.client.update_inputs(inputs, completion=lambda err: _settle(fut, err)),
            timeout,
        )
        if not error:
            # The join turned microphone publishing off; an enabled input is silent without it.
            error = self._call(
                "update_publishing",
                lambda fut: session.client.update_publishing(
                    {"microphone": {"isPublishing": True}}, completion=lambda err: _settle(fut, err)
                ),
                timeout,
            )
        if error:
            self._raise_send_error(session, str(error))

    def leave(self, *, background: bool = False) -> None:
        """Leave the call (waiting at most ``LEAVE_TIMEOUT_S``), then release the client. Idempotent.

        ``background=True`` returns at once and does both on a thread of its own, for a client
        whose join is still pending (see :func:`wait_for_cleanup`).
        """
        with self._lock:
            session, self._session = self._session, None
            self._mic_on = None
            with _sdk_lock:
                _live.discard(self)
            if session is None:
                return
            session.close()
            if session.client is None:
                return
            if background:
                _close_in_background(session.client, self.room, self._scrub)
            else:
                _close_client(session.client, self.room, self._scrub, LEAVE_TIMEOUT_S)
