"""Prometheus metrics of one worker process, served on ``/metrics`` when a port is set.

The core calls the plain functions below at each lifecycle step; nothing else touches the
metric objects. Labels are kept bounded: utterance states and message kinds are checked
against fixed sets, and a conversation's backlog label is removed when the worker lets the
conversation go (:func:`forget_conversation`), so a long-lived worker does not grow a series
per conversation it ever held.

With the threads pool one worker is one process, so the default registry is the whole story;
scale out with more processes, each with its own port (or its own container).
"""

from __future__ import annotations

import contextlib
import os
import threading

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

#: the states an utterance can end in
FINAL_STATES = ("sent", "spoken", "interrupted", "cancelled", "failed")
#: the kinds of app message a worker sends
MESSAGE_KINDS = ("text", "audio", "interrupt")

# One app message: loopback sends take about a millisecond, a Daily send tens of milliseconds,
# and anything near send_timeout_s (10 s by default) is a problem worth seeing.
_SEND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Enqueue to first message in the room: includes waiting behind the conversation's backlog.
_FIRST_AUDIO_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

UTTERANCES = Counter("echoq_utterances", "Utterances that reached a final state", ["state"])
MESSAGES_SENT = Counter("echoq_messages_sent", "App messages sent into rooms", ["kind"])
SEND_SECONDS = Histogram("echoq_send_seconds", "Time to send one app message", buckets=_SEND_BUCKETS)
SEND_RETRIES = Counter("echoq_send_retries", "Sends retried after a transient error", ["reason"])
FIRST_AUDIO_SECONDS = Histogram(
    "echoq_first_audio_seconds",
    "Time from enqueue to the utterance's first message in the room",
    buckets=_FIRST_AUDIO_BUCKETS,
)
SENDS_FENCED = Counter("echoq_sends_fenced", "Sends refused because this worker's lease was gone")
SESSIONS_HELD = Gauge("echoq_sessions_held", "Room sessions this worker process holds")
CONVERSATIONS_WAITING = Gauge(
    "echoq_conversations_waiting",
    "Open conversations no worker could take at this worker's last scan (every worker at its limit)",
)
PACING_LATENESS = Histogram(
    "echoq_pacing_lateness_seconds",
    "How late the pacing loop took a real-time audio chunk that was due",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
)
GC_PAUSE_SECONDS = Histogram(
    "echoq_gc_pause_seconds",
    "Full (generation 2) garbage collections of this worker process: every thread waits meanwhile",
    buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
)
PACING_PLAYING = Gauge("echoq_pacing_playing", "Utterances the pacing loop is playing now")
CONVERSATIONS_SHED = Counter(
    "echoq_conversations_shed", "Conversations this worker let go because it could not keep up",
)
BACKLOG = Gauge("echoq_backlog", "Log entries not yet sent, per conversation", ["conversation_id"])

# Pre-create the fixed label sets so dashboards see zeros instead of missing series.
for _state in FINAL_STATES:
    UTTERANCES.labels(state=_state)
for _kind in MESSAGE_KINDS:
    MESSAGES_SENT.labels(kind=_kind)

_server_lock = threading.Lock()
_server_port = 0

DEFAULT_HOST = "127.0.0.1"


def utterance_finished(state: str) -> None:
    """Count an utterance that ended in ``state`` (one of :data:`FINAL_STATES`)."""
    if state not in FINAL_STATES:
        raise ValueError(f"not a final utterance state: {state!r}")
    UTTERANCES.labels(state=state).inc()


def message_sent(kind: str, seconds: float) -> None:
    """Count one acknowledged app message of ``kind`` and observe how long its send took."""
    if kind not in MESSAGE_KINDS:
        raise ValueError(f"not a message kind: {kind!r}")
    MESSAGES_SENT.labels(kind=kind).inc()
    SEND_SECONDS.observe(seconds)


def send_retry(reason: str) -> None:
    """Count one retried send; ``reason`` is a short, fixed word (an error class name), never a message."""
    SEND_RETRIES.labels(reason=reason).inc()


def send_fenced() -> None:
    """Count one message not sent because the lease had run out (a paused or cut-off worker)."""
    SENDS_FENCED.inc()


def first_message(seconds: float) -> None:
    """Observe the time from an utterance's enqueue to its first message in the room."""
    FIRST_AUDIO_SECONDS.observe(seconds)


def pacing_lateness(seconds: float) -> None:
    """A real-time chunk was taken ``seconds`` after it was due."""
    PACING_LATENESS.observe(max(0.0, seconds))


def gc_pause(seconds: float) -> None:
    """A full garbage collection held the process for ``seconds``."""
    GC_PAUSE_SECONDS.observe(seconds)


def pacing_playing(n: int) -> None:
    PACING_PLAYING.set(n)


def sessions_held(n: int) -> None:
    """Set how many room sessions this process holds."""
    SESSIONS_HELD.set(n)


def conversations_waiting(n: int) -> None:
    """Set how many open conversations wait for a worker with room (the same fleet-wide count on
    every worker that is full; 0 on a worker with room, which takes them)."""
    CONVERSATIONS_WAITING.set(n)


def backlog(conversation_id: str, n: int) -> None:
    """Set how many entries of a conversation's log are waiting to be sent."""
    BACKLOG.labels(conversation_id=conversation_id).set(n)


def conversation_shed() -> None:
    """Count one conversation let go because this worker could not keep up."""
    CONVERSATIONS_SHED.inc()


def forget_conversation(conversation_id: str) -> None:
    """Drop a conversation's backlog series (when this worker stops holding it)."""
    with contextlib.suppress(KeyError):
        BACKLOG.remove(conversation_id)


def start_server(port: int, host: str | None = None) -> int:
    """Serve ``/metrics`` on ``port``; return the port served, or 0 when ``port`` is 0 (off).

    Binds ``host``, else ``ECHOQ_METRICS_HOST``, else 127.0.0.1: exposing metrics beyond the
    machine is a decision (a container sets ``ECHOQ_METRICS_HOST=0.0.0.0``). Idempotent: a
    second call returns the port of the server already running.
    """
    global _server_port
    if port == 0:
        return 0
    if port < 0 or port > 65535:
        raise ValueError(f"not a TCP port: {port}")
    with _server_lock:
        if _server_port:
            return _server_port
        addr = host or os.environ.get("ECHOQ_METRICS_HOST") or DEFAULT_HOST
        httpd, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
        _server_port = int(httpd.server_port)
        return _server_port
