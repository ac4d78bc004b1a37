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

The same crash has a second door: a doorbell that was running across the reconnect finishes
afterwards and acks its message on the old channel, whose connection is gone; kombu's
``ack_log_error`` lets the ``AttributeError`` through and the worker exits. Acks and rejects on a
channel whose connection is gone are logged and left undone instead (the message comes back after
the visibility timeout, as above); any other error still escapes.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.message import Message

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


def _connection_gone(message: Message) -> bool:
    """Whether ``message`` came on a channel whose broker connection has since been closed."""
    transport = getattr(message.channel, "connection", None)
    return transport is None or getattr(transport, "client", None) is None


def _outliving_lost_connection(settle: Any, what: str) -> Any:
    def settle_or_log(self: Message, logger: Any, errors: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return settle(self, logger, errors, *args, **kwargs)
        except AttributeError as err:
            if not _connection_gone(self):
                raise
            step(log, f"broker.{what}_lost", logging.WARNING, delivery_tag=str(self.delivery_tag), reason=str(err))
            return None

    return settle_or_log


# installed where this module is loaded: in `echoq worker` processes (Celery's worker_consumer)
if not getattr(Message.ack_log_error, "_echoq", False):
    for _name, _what in (("ack_log_error", "ack"), ("reject_log_error", "reject")):
        _wrapped = _outliving_lost_connection(getattr(Message, _name), _what)
        _wrapped._echoq = True
        setattr(Message, _name, _wrapped)
