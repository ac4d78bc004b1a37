"""Daily rooms through daily-python: one ``CallClient`` per conversation.

What the SDK does, and what this module does about it (PROTOCOL.md, Daily section; the SDK's
process-wide plumbing is in :mod:`.daily_sdk`, the microphone track in :mod:`.daily_track`):

- Callbacks and events run on the SDK thread while it holds the GIL. They only set futures,
  flags and conditions, or hand an event to ``on_event``; they never block and never call the
  client back, which could deadlock the SDK thread against itself.
- ``on_error`` is informational: the SDK fires it for every failed request (one send, one join)
  as well as for real trouble. Whether the call is gone is told by ``on_call_state_updated``
  (``left``/``error``) and the network status; whether a request failed, by its own completion.
  A send that fails with ``ChannelNotOpen`` while the call says ``joined`` is retried; only
  :data:`CHANNEL_FAILURES_BEFORE_LOST` of them in a row count as a lost call (rejoin).
- The replica is the remote participant named ``ECHOQ_REPLICA_USER_NAME``, or (when that is
  unset) one that has sent Tavus's replica events, or else any remote participant. Its presence
  is watched for the whole call: while it is away, ``send`` and ``write_frames`` wait for it
  (nothing is played to an empty room), and ``on_event`` gets ``echoq.replica.left`` /
  ``echoq.replica.joined`` so the session can say so.
- A meeting token (given, or ``?t=…`` in the URL) is passed to ``join`` as ``meeting_token``
  and never appears in a log line or an error message: rooms are named by host and path only,
  and SDK error strings are scrubbed of it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus

from ..errors import JoinFailed, ReplicaAbsent, RoomDisconnected, SendFailed
from ..logs import ms_since, step
from . import daily_sdk
from .base import REPLICA_JOINED, REPLICA_LEFT, EventHandler, Transport
from .daily_sdk import wait_for_cleanup
from .daily_track import MicrophoneTrack
from .urls import room_label, split_token

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["CLIENT_SETTINGS", "DailyTransport", "REPLICA_JOINED", "REPLICA_LEFT", "shutdown_all", "wait_for_cleanup"]

log = logging.getLogger("echoq.daily")

#: Client settings for every join: the worker sends app messages, it has no camera and no mic
#: until microphone echo asks for one (see :meth:`DailyTransport.write_frames`).
CLIENT_SETTINGS: dict[str, Any] = {
    "inputs": {"camera": False, "microphone": False},
    "publishing": {"camera": {"isPublishing": False}, "microphone": {"isPublishing": False}},
}

#: ``ChannelNotOpen`` sends in a row, while the call still says ``joined``, that count as a lost call.
CHANNEL_FAILURES_BEFORE_LOST = 3

_CHANNEL_DOWN = re.compile(r"channelnotopen|not ?joined|disconnected", re.IGNORECASE)
# Tavus's events that only the replica sends: their sender is the replica.
_REPLICA_EVENT = re.compile(r"^conversation\.replica\.")
_ABORTED = "abandoned: the worker is stopping"
_WAIT_SLICE_S = 0.25

_registry_lock = threading.Lock()
_live: set[DailyTransport] = set()


def shutdown_all(timeout: float = 10.0) -> bool:
    """Leave and release every Daily client of this process (worker shutdown).

    A join still pending is abandoned at once (its client is released in the background, see
    :func:`~.daily_sdk.close_in_background`); the call waits at most ``timeout`` for those
    background releases. True when every client is released.
    """
    with _registry_lock:
        transports = list(_live)
    for transport in transports:
        try:
            transport.abandon_join()
            transport.leave()
        except Exception:  # one stuck room must not keep the others from being released
            log.exception("leaving %s at shutdown failed", transport.room)
    if not wait_for_cleanup(timeout):
        log.warning("daily clients still being released after %.1fs at shutdown", timeout)
        return False
    return True


# ---------------------------------------------------------------------------------------------
# One join's state, shared with the SDK thread


class _Session:
    """What one ``CallClient`` knows: the call's state, who is in it, whether the replica is.

    Every join makes a new session, so events that arrive late from a client that has been left
    land on its own, closed session and cannot touch the next join.
    """

    def __init__(self, transport: DailyTransport, client: Any) -> None:
        self.transport = transport
        self.client = client
        self.cond = threading.Condition()
        self.call_state = "new"
        self.joined = False
        self.closed = False
        self.lost_reason: str | None = None
        self.channel_failures = 0
        self.remote: dict[str, Mapping[str, Any]] = {}
        self.signalled: set[str] = set()  # participants that sent the replica's own events
        self.replica_names: set[str] = set()  # and their user names, to know the replica when it returns
        self._gone: set[str] = set()
        self._replica_was_present = False

    @property
    def usable(self) -> bool:
        return self.joined and not self.closed and self.lost_reason is None

    # under self.cond ------------------------------------------------------------------------

    def replica_present(self) -> bool:
        wanted = self.transport.settings.replica_user_name
        if wanted:
            return any(_user_name(info) == wanted for info in self.remote.values())
        if self.replica_names:
            return any(
                pid in self.signalled or _user_name(info) in self.replica_names for pid, info in self.remote.items()
            )
        return bool(self.remote)

    def _changed(self) -> dict[str, Any] | None:
        """Notify waiters; the presence event to emit if the replica came or went."""
        self.cond.notify_all()
        if not self.joined or self.closed:
            return None
        present = self.replica_present()
        if present == self._replica_was_present:
            return None
        self._replica_was_present = present
        return {"event_type": REPLICA_JOINED if present else REPLICA_LEFT}

    # called from the SDK thread or the caller's ----------------------------------------------

    def _update(self, fn: Any) -> None:
        with self.cond:
            fn()
            event = self._changed()
        if event is not None:  # handed on outside the lock
            self.transport._emit_safely(event)

    def mark_joined(self, participants: Mapping[str, Any] | None) -> None:
        def apply() -> None:
            self.joined = True
            self.call_state = "joined"
            self._merge(participants)

        self._update(apply)

    def merge_snapshot(self, participants: Mapping[str, Any] | None) -> None:
        self._update(lambda: self._merge(participants))

    def _merge(self, participants: Mapping[str, Any] | None) -> None:
        # A snapshot may be older than a participant_left already seen: never resurrect those.
        for key, info in (participants or {}).items():
            pid = _participant_id(key, info)
            if pid and pid not in self._gone and not _is_local(key, info):
                self.remote[pid] = info

    def set_call_state(self, state: str) -> None:
        with self.cond:
            self.call_state = state
            if state in ("left", "error") and self.lost_reason is None and not self.closed:
                self.lost_reason = f"call state {state}"
            self.cond.notify_all()

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

        def apply() -> None:
            self._gone.discard(pid)
            self.remote[pid] = info

        self._update(apply)

    def participant_updated(self, info: Mapping[str, Any]) -> None:
        pid = _participant_id(None, info)

        def apply() -> None:
            if pid in self.remote:
                self.remote[pid] = info

        self._update(apply)

    def participant_left(self, info: Mapping[str, Any]) -> None:
        pid = _participant_id(None, info)
        if not pid:
            return

        def apply() -> None:
            self._gone.add(pid)
            self.remote.pop(pid, None)

        self._update(apply)

    def replica_signal(self, sender: str) -> None:
        def apply() -> None:
            self.signalled.add(sender)
            info = self.remote.get(sender)
            name = _user_name(info) if info is not None else None
            if name is not None:
                self.replica_names.add(name)

        self._update(apply)


def _wait(future: Future[Any], timeout: float) -> Any:
    """``future.result(timeout)`` in short slices: a signal that lands on one of the SDK's own
    threads is only acted on (Ctrl-C raised) when this thread runs Python code again."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            return future.result(timeout=max(0.0, min(remaining, _WAIT_SLICE_S)))
        except FutureTimeout:
            if remaining <= _WAIT_SLICE_S:
                raise


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


def _is_replica_event(message: Mapping[str, Any]) -> bool:
    etype = message.get("event_type")
    props = message.get("properties")
    role = props.get("role") if isinstance(props, Mapping) else None
    return bool(isinstance(etype, str) and _REPLICA_EVENT.match(etype)) or role == "replica"


# ---------------------------------------------------------------------------------------------
# Event handler


class _HandlerMixin:
    """Events of one ``CallClient``.

    Every method runs on the SDK thread while it holds the GIL: it only updates the session
    (a short lock, never held while calling out) or hands an event to ``on_event``. It never
    blocks and never calls the client, because the client's calls complete on this very thread
    and would wait on themselves.
    """

    session: _Session

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # The SDK's native base class takes no constructor arguments.
        return super().__new__(cls)

    def __init__(self, session: _Session) -> None:
        self.session = session

    def on_call_state_updated(self, state: str) -> None:
        self.session.set_call_state(state)

    def on_network_connection_status_updated(self, status: Any) -> None:
        if _network_lost(status):
            self.session.mark_lost("network connection interrupted")

    def on_error(self, message: str) -> None:
        # Informational: a failed request fires it too, and its completion says so already.
        transport = self.session.transport
        log.info("daily reported %s room=%s", transport._scrub(str(message)), transport.room)

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
        if isinstance(sender, str) and _is_replica_event(message):
            self.session.replica_signal(sender)
        self.session.transport._emit_safely(message)


# ---------------------------------------------------------------------------------------------
# The transport


class DailyTransport(Transport):
    """A Daily room held by one ``daily.CallClient``.

    ``daily_module`` replaces the ``daily`` package (tests pass the in-memory double); by default
    ``daily`` is imported on the first join. ``meeting_token`` joins a private room (a token in
    the URL's query is used when none is given).
    """

    def __init__(
        self,
        url: str,
        *,
        settings: Settings,
        on_event: EventHandler | None = None,
        daily_module: Any = None,
        meeting_token: str | None = None,
    ) -> None:
        super().__init__(url, on_event)
        self.settings = settings
        self.room = room_label(url)
        self._join_url, url_token = split_token(url)
        self._token = meeting_token or url_token
        self._sdk = daily_module
        self._lock = threading.RLock()
        self._session: _Session | None = None
        self._pending_join: Future[tuple[Any, Any]] | None = None
        # Microphone tracks by sample rate, made once per transport and reused across rejoins.
        self._tracks: dict[int, MicrophoneTrack] = {}
        self._mic_on: tuple[_Session, int] | None = None

    # -- helpers ------------------------------------------------------------------------------

    def _module(self) -> Any:
        if self._sdk is None:
            self._sdk = daily_sdk.import_daily()
        return self._sdk

    def _scrub(self, text: str) -> str:
        """``text`` with the meeting token blanked out (SDK errors may quote the URL)."""
        if self._token:
            for form in {self._token, quote(self._token, safe=""), quote_plus(self._token)}:
                text = text.replace(form, "***")
        return text

    def _emit_safely(self, event: dict[str, Any]) -> None:
        try:
            self._emit(event)
        except Exception:  # a handler's bug must not escape into the SDK thread
            log.exception("daily event handler failed room=%s", self.room)

    def _usable_session(self) -> _Session:
        session = self._session
        if session is None or not session.joined or session.closed:
            raise RoomDisconnected(f"daily room {self.room} is not joined")
        if session.lost_reason is not None:
            raise RoomDisconnected(f"daily room {self.room} connection lost ({session.lost_reason})")
        return session

    # -- Transport ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        session = self._session
        return session is not None and session.usable

    @property
    def replica_present(self) -> bool:
        """Whether the replica is in the room now."""
        session = self._session
        if session is None or not session.usable:
            return False
        with session.cond:
            return session.replica_present()

    def join(self, timeout: float) -> None:
        """Join the room; :class:`JoinFailed` when the SDK reports an error or ``timeout`` passes.

        On an SDK error the client is left and released before the error is raised. On a
        timeout, on :meth:`abandon_join` or on Ctrl-C the join is still pending inside the SDK,
        which holds the client until it gives up, so the client is left and released in the
        background and the error is raised at once.
        """
        with self._lock:
            if self._session is not None:
                self.leave()
            sdk = self._module()
            daily_sdk.ensure_init(sdk)
            t0 = time.monotonic()
            session = _Session(self, None)
            client = sdk.CallClient(event_handler=daily_sdk.handler_class(sdk, _HandlerMixin)(session))
            session.client = client
            self._session = session
            done: Future[tuple[Any, Any]] = Future()
            self._pending_join = done
            with _registry_lock:
                _live.add(self)
            try:
                client.join(
                    self._join_url,
                    meeting_token=self._token,
                    client_settings=CLIENT_SETTINGS,
                    completion=lambda data, error: daily_sdk.settle(done, (data, error)),
                )
                data, error = _wait(done, timeout)
            except FutureTimeout:
                self.leave(background=True)
                raise JoinFailed(f"join of daily room {self.room} timed out after {timeout:.1f}s") from None
            except BaseException as exc:  # KeyboardInterrupt too: the client must still be released
                self.leave(background=True)
                if not isinstance(exc, Exception):
                    raise
                raise JoinFailed(f"join of daily room {self.room} failed: {self._scrub(str(exc))}") from None
            finally:
                self._pending_join = None
            if error == _ABORTED:
                self.leave(background=True)
                raise JoinFailed(f"join of daily room {self.room} {_ABORTED}")
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

    def abandon_join(self) -> None:
        """Make a join in progress on another thread give up now (worker shutdown)."""
        pending = self._pending_join
        if pending is not None:
            daily_sdk.settle(pending, (None, _ABORTED))

    def wait_for_replica(self, timeout: float) -> None:
        """Block until the replica is in the room.

        Raises :class:`ReplicaAbsent` after ``timeout`` and :class:`RoomDisconnected` if the call
        is lost meanwhile.
        """
        session = self._usable_session()
        deadline = time.monotonic() + timeout
        with session.cond:
            while not session.replica_present():
                if not session.usable:
                    reason = session.lost_reason or "left"
                    raise RoomDisconnected(
                        f"daily room {self.room} connection lost while waiting for the replica ({reason})"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    name = self.settings.replica_user_name
                    who = repr(name) if name else "any participant"
                    raise ReplicaAbsent(f"replica ({who}) is not in daily room {self.room} after {timeout:.1f}s")
                session.cond.wait(remaining)

    def send(self, message: dict[str, Any]) -> None:
        """Send one app message to everyone in the room once the replica is there.

        Raises :class:`ReplicaAbsent` when the replica stays away for
        ``settings.replica_wait_timeout_s``, :class:`RoomDisconnected` when the call is not
        usable, and :class:`SendFailed` when the send's completion reports an error or does not
        come within ``settings.send_timeout_s``.
        """
        session = self._usable_session()
        self.wait_for_replica(self.settings.replica_wait_timeout_s)
        error = daily_sdk.call(
            "send",
            self.room,
            lambda done: session.client.send_app_message(message, None, completion=done),
            self.settings.send_timeout_s,
        )
        if error:
            self._raise_send_error(session, str(error))
        session.channel_failures = 0

    def _raise_send_error(self, session: _Session, error: str) -> None:
        error = self._scrub(error)
        if session.call_state != "joined" or session.lost_reason is not None:
            session.mark_lost(error)
            raise RoomDisconnected(f"daily room {self.room} is not connected: {error}")
        if _CHANNEL_DOWN.search(error):
            session.channel_failures += 1
            if session.channel_failures >= CHANNEL_FAILURES_BEFORE_LOST:
                # Every send fails the same way while the call still says joined: rejoin.
                session.mark_lost(error)
                raise RoomDisconnected(f"daily room {self.room} is not connected: {error}")
        raise SendFailed(f"send to daily room {self.room} failed: {error}")

    def write_frames(self, pcm: bytes, sample_rate: int) -> None:
        """Write s16le mono PCM to the room's microphone track once the replica is there.

        The first call on a join makes the track (one per sample rate, reused across rejoins)
        the call's microphone. Blocks for as long as the audio lasts; a short write raises
        :class:`SendFailed`.
        """
        session = self._usable_session()
        self.wait_for_replica(self.settings.replica_wait_timeout_s)
        with self._lock:
            track = self._tracks.get(sample_rate)
            if track is None:
                track = self._tracks[sample_rate] = MicrophoneTrack(self._module(), sample_rate)
            if self._mic_on != (session, sample_rate):
                self._publish(session, track)
                self._mic_on = (session, sample_rate)
        # Blocking write: the SDK paces it at real time, so it is done outside the lock.
        track.write(pcm, self.room)

    def _publish(self, session: _Session, track: MicrophoneTrack) -> None:
        timeout = self.settings.send_timeout_s
        client = session.client
        error = daily_sdk.call(
            "update_inputs", self.room, lambda done: client.update_inputs(track.inputs, completion=done), timeout
        )
        if not error:
            error = daily_sdk.call(
                "update_publishing",
                self.room,
                lambda done: client.update_publishing(MicrophoneTrack.PUBLISHING, completion=done),
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
            with _registry_lock:
                _live.discard(self)
            if session is None:
                return
            session.close()
            if session.client is None:
                return
            if background:
                daily_sdk.close_in_background(session.client, self.room, self._scrub)
            else:
                daily_sdk.close_client(session.client, self.room, self._scrub, daily_sdk.LEAVE_TIMEOUT_S)
