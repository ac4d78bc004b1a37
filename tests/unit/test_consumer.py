"""A doorbell that finishes after a broker reconnect acks on a channel whose connection is gone:
that is logged and left undone (the message comes back after the visibility timeout), while any
other error in an ack still escapes."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from kombu.message import Message

import worker.consumer  # noqa: F401  (installs the guard, as `echoq worker` does)


class Channel:
    def __init__(self, client: Any) -> None:
        self.connection = SimpleNamespace(client=client)
        self.no_ack_consumers: set[str] = set()

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        # what kombu's Redis transport does once the connection it belonged to was closed
        raise AttributeError("'NoneType' object has no attribute 'hostname'")

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        raise AttributeError("'NoneType' object has no attribute 'hostname'")


def test_an_ack_on_a_channel_whose_connection_is_gone_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    message = Message(body=b"{}", delivery_tag=7, channel=Channel(client=None))
    message.ack_log_error(logging.getLogger("test"), ())
    message.reject_log_error(logging.getLogger("test"), (), requeue=True)
    assert message._state == "RECEIVED"  # not acked: Redis delivers it again later
    assert "broker.ack_lost" in caplog.text and "broker.reject_lost" in caplog.text


def test_the_same_error_on_a_live_connection_still_escapes() -> None:
    message = Message(body=b"{}", delivery_tag=8, channel=Channel(client=SimpleNamespace(hostname="redis")))
    with pytest.raises(AttributeError):
        message.ack_log_error(logging.getLogger("test"), ())
