"""Celery's consumer, made to outlive a broker (Redis) restart.

When the broker connection drops, Celery closes the lost connection, and closing its channel
hands the unacknowledged messages back to Redis through a connection that is already gone: an
``AttributeError`` (``'NoneType' object has no attribute 'hostname'``, celery#7185) escapes and
the worker exits with "Unrecoverable error". With late acks there is nearly always such a
message (a running doorbell), so every Redis restart killed every worker.

Here that one failure is logged and the consumer goes on to reconnect as it would for any other
connection error. The messages it could not hand back stay in kombu's unacked set in Redis and
are delivered again after the visibility timeout: they are doorbells, and a second ring finds
nothing to do (the log, the cursor and the lease decide what is sent).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from .logs import step

log = logging.getLogger("echoq.consumer")


class Consumer(CeleryConsumer):
    """The default consumer, minus the crash on closing a lost broker connection."""

    def on_connection_error_after_connected(self, exc: Any) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as err:
            step(log, "broker.reconnect", logging.WARNING, reason=type(exc).__name__,
                 unacked_not_restored=str(err))
