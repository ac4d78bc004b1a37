"""Celery tasks: thin, like web views. They parse, call the session manager, and map errors.

Every task is a doorbell or a nudge; the truth is in Redis (see :mod:`worker.store`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

import redis
from celery import signals

from . import audio, chunks, gcwatch, keys, metrics, redisio
from .celery_app import app
from .errors import PermanentError
from .logs import setup_logging, step
from .sessions import SessionManager, install, manager
from .settings import get_settings

log = logging.getLogger("echoq.tasks")

#: the custom state of a drain task while an utterance is being sent (meta: ids and chunk counts)
PROGRESS_STATE = "SENDING"
#: Flower builds task state from events, and an unknown ``task-<name>`` event becomes state
#: ``<NAME>``: this event makes Flower show SENDING too. Flower lists only Celery's own task
#: fields, so the chunk counts also ride in ``result``, which the succeeded event then replaces.
PROGRESS_EVENT = f"task-{PROGRESS_STATE.lower()}"
#: how long a stopping worker waits for an adopting thread before it ends the process
_ADOPT_EXIT_WAIT_S = 2.0


@app.task(name=keys.TASK_OPEN, bind=True)
def open_conversation(self: Any, conversation_id: str) -> dict[str, Any]:
    """Take a newly opened conversation if this worker has room (any worker may)."""
    session = manager().adopt(conversation_id)
    return {"conversation_id": conversation_id, "owner": manager().hostname if session else None}


# ignore_result=False: update_state() stores SENDING in the result backend, and only a stored
# result replaces it when the task ends (otherwise the backend would say SENDING until it expires).
@app.task(name=keys.TASK_DRAIN, bind=True, ignore_result=False)
def drain(self: Any, conversation_id: str) -> dict[str, Any]:
    """Send every utterance of the conversation after its cursor, in order."""
    last = [0.0]

    def progress(utterance_id: str, sent: int, total: int | None) -> None:
        # ``total`` is the sender's estimate until the last chunk, when it is the count itself
        now = time.monotonic()
        done = total is not None and sent == total
        if now - last[0] >= 0.5 or done:
            last[0] = now
            known, estimate = (total, None) if done else (None, total)
            meta = {"conversation_id": conversation_id, "utterance_id": utterance_id, "chunks_sent": sent,
                    "chunks_total": known, "chunks_estimate": estimate}
            # short, count first: Flower's task table cuts long results off with an ellipsis
            count = chunks.progress_text(sent, known, estimate)
            # progress is for people watching; a message already in the room must not fail
            # because the backend or the broker is away for a moment
            try:
                self.update_state(state=PROGRESS_STATE, meta=meta)
                self.send_event(PROGRESS_EVENT, result=f"{count} chunks, {utterance_id[:8]}", **meta)
            except Exception as exc:
                log.debug("progress of %s not reported: %s", conversation_id, exc)

    handled = manager().drain(conversation_id, progress if self.request.id else None)
    return {"conversation_id": conversation_id, "utterances": handled}


@app.task(name=keys.TASK_INTERRUPT)
def interrupt(conversation_id: str) -> dict[str, Any]:
    """Wake the sender so it sees the interrupt now, and send it when the room is idle."""
    session = manager().get(conversation_id)
    if session is not None:
        session.poke()
    handled = manager().drain(conversation_id)
    return {"conversation_id": conversation_id, "utterances": handled}


@app.task(name=keys.TASK_CLOSE)
def close(conversation_id: str) -> dict[str, Any]:
    """Send what is left, leave the room, mark the conversation closed."""
    manager().close(conversation_id)
    return {"conversation_id": conversation_id}


# worker lifecycle ----------------------------------------------------------------------------


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    audio.keep_warm(settings.warm_decoder)
    client = redisio.connect(settings.redis_url)
    hostname = getattr(sender, "hostname", None)
    threads = getattr(getattr(sender, "pool", None), "limit", None)  # -c, which may differ from the setting
    install(lambda: SessionManager(app, settings, client, hostname, threads=threads))
    if settings.metrics_port:
        port = metrics.start_server(settings.metrics_port)
        step(log, "metrics.serving", port=port)
    gcwatch.install(freeze=settings.gc_freeze)


@signals.worker_shutting_down.connect
def _on_shutting_down(**_: Any) -> None:
    with contextlib.suppress(PermanentError):  # no manager: the worker never became ready
        manager().begin_shutdown()


@signals.worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    try:
        # A worker stopped before it was ready (e.g. Redis never answered) holds no sessions:
        # nothing to hand back, and nothing to report.
        sessions = manager()
    except PermanentError:
        sessions = None
    if sessions is not None:
        try:
            sessions.shutdown()
        except redis.RedisError as exc:
            # One line, not the chain of connection tracebacks: leases expire on their own and
            # another worker resumes from the cursor.
            step(log, "worker.shutdown_incomplete", logging.WARNING, reason=f"Redis unreachable: {exc}",
                 leases="expire after ECHOQ_LEASE_TTL_S")
        except Exception:
            log.exception("shutdown of sessions failed")
    try:
        from .transports import daily

        # A join still pending is abandoned at once; its client's release waits at most this long.
        released = daily.shutdown_all(get_settings().join_timeout_s)
    except ImportError:
        return
    if not released:
        # daily-python still holds a client for a join it has not given up on (19-49 s for an
        # unreachable room): Python's exit would wait for it, and the SDK aborts a process that
        # exits without it. Everything is handed back and Celery is done by now: end here.
        # The abandoned join's adopting thread hands its lease back first (it returns at once).
        for thread in threading.enumerate():
            if thread.name.startswith("echoq-adopt"):
                thread.join(_ADOPT_EXIT_WAIT_S)
        step(log, "worker.exit", logging.WARNING, reason="daily client held by a pending join")
        logging.shutdown()
        os._exit(0)
