"""daily-python's process-wide plumbing: the only module in echoq that imports ``daily``.

- ``Daily.init()`` may run once per process, and never in a process that later forks: children
  forked after it hang. It runs here lazily, under a lock, on the first join, so importing the
  transport (as the worker's parent does) never initialises the SDK.
- Every SDK call returns at once and reports through a completion callback on the SDK's own
  thread; :func:`call` turns that callback into a future and waits on it with its own timeout.
- A client must be left and released before the interpreter exits: one dropped with a join
  pending hangs ~19 s, then the SDK aborts the process. Clients whose join is still pending are
  left and released on a thread of their own (:func:`close_in_background`), and
  :func:`wait_for_cleanup` waits for those threads (also at interpreter exit, bounded).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from ..errors import ConfigError, SendFailed
from ..logs import ms_since, step

log = logging.getLogger("echoq.daily")

#: How long a leave waits for the SDK's completion before the client is released anyway.
LEAVE_TIMEOUT_S = 5.0
#: The same wait for the client of a pending join, released in the background: its leave
#: queues behind the join, which the SDK may take up to ~50 s to give up on.
BACKGROUND_LEAVE_TIMEOUT_S = 60.0

_lock = threading.Lock()
# The SDK modules ``Daily.init()`` has run for, with the pid it ran in. Normally one entry, the
# real ``daily``; tests inject doubles, each of which is its own "process".
_initialised: list[tuple[Any, int]] = []
_cleanups: set[threading.Thread] = set()
_handler_classes: list[tuple[Any, type]] = []


def import_daily() -> Any:
    """The ``daily`` module; :class:`ConfigError` when daily-python is not installed."""
    try:
        return importlib.import_module("daily")
    except ImportError as exc:
        raise ConfigError("daily-python is not installed; it is needed for https:// conversation URLs") from exc


def ensure_init(sdk: Any) -> None:
    """``Daily.init()`` once per process for ``sdk``, refusing to touch it in a forked child."""
    with _lock:
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
        if not _initialised:
            # Released clients only: one still held at exit would abort the interpreter.
            atexit.register(wait_for_cleanup, BACKGROUND_LEAVE_TIMEOUT_S)
        _initialised.append((sdk, os.getpid()))
        log.debug("daily initialised pid=%s", os.getpid())


def handler_class(sdk: Any, mixin: type) -> type:
    """A subclass of ``mixin`` and ``sdk.EventHandler``, made once per SDK module.

    Built at run time because ``daily`` is imported lazily (and tests pass a double); the SDK
    expects its handler to derive from its own ``EventHandler``.
    """
    with _lock:
        for module, cls in _handler_classes:
            if module is sdk and issubclass(cls, mixin):
                return cls
        cls = type("EchoqDailyHandler", (mixin, sdk.EventHandler), {})
        _handler_classes.append((sdk, cls))
        return cls


def settle(future: Future[Any], value: Any) -> None:
    """Resolve ``future`` from an SDK callback; a late or repeated callback is ignored."""
    # InvalidStateError: resolved between the check and the set; the first answer wins.
    with contextlib.suppress(InvalidStateError):
        if not future.done():
            future.set_result(value)


def call(what: str, room: str, start: Callable[[Callable[..., None]], None], timeout: float) -> Any:
    """Start one SDK call, passing it a completion; wait up to ``timeout`` for that completion.

    Returns the completion's single argument (an error string or None); :class:`SendFailed`
    when no completion comes in time.
    """
    future: Future[Any] = Future()
    start(lambda error=None, *_rest: settle(future, error))
    try:
        return future.result(timeout=timeout)
    except FutureTimeout:
        raise SendFailed(f"{what} in daily room {room} got no answer within {timeout:.1f}s") from None


def close_client(client: Any, room: str, scrub: Callable[[str], str], leave_timeout: float) -> None:
    """``leave`` (waiting at most ``leave_timeout`` for its completion), then ``release``."""
    t0 = time.monotonic()
    left: Future[Any] = Future()
    try:
        # The completion of a leave has one argument, ``None`` on success (``(None,)``).
        client.leave(completion=lambda *args: settle(left, args[0] if args else None))
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
        except Exception as exc:  # "already been released": nothing is held any more
            log.debug("release of daily client for %s: %s", room, scrub(str(exc)))
    step(log, "daily.released", room=room, ms=ms_since(t0))


def close_in_background(client: Any, room: str, scrub: Callable[[str], str]) -> None:
    """Leave and release ``client`` on a thread of its own.

    Calls on one client run in order, so a leave queued behind a join that is still pending
    answers only once the SDK gives up on that join (19–49 s offline), and ``release`` blocks
    until then. A caller giving up on a join must not wait for that.
    """

    def run() -> None:
        try:
            close_client(client, room, scrub, BACKGROUND_LEAVE_TIMEOUT_S)
        finally:
            with _lock:
                _cleanups.discard(threading.current_thread())

    thread = threading.Thread(target=run, name="echoq-daily-release", daemon=True)
    with _lock:
        _cleanups.add(thread)
    thread.start()


def wait_for_cleanup(timeout: float | None = None) -> bool:
    """Wait for background releases of abandoned joins; True when none is left running."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _lock:
            threads = list(_cleanups)
        if not threads:
            return True
        for thread in threads:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            thread.join(remaining)
