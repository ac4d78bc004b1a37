"""A worker's shutdown handler says in one line what it could not do, and nothing when there was
nothing to do: no chain of connection tracebacks ending in a message about session managers."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis

from worker import tasks
from worker.errors import PermanentError


class _Sessions:
    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.calls = 0

    def shutdown(self) -> None:
        self.calls += 1
        if self.error is not None:
            raise self.error


def _no_manager() -> Any:
    raise PermanentError("no session manager in this process: sessions live in `echoq worker` processes")


def shutdown_records(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                     manager: Any) -> list[logging.LogRecord]:
    monkeypatch.setattr(tasks, "manager", manager)
    with caplog.at_level(logging.INFO, logger="echoq"):
        tasks._on_shutdown()
    return [r for r in caplog.records if r.name == "echoq.tasks"]


def test_a_worker_that_never_became_ready_stops_silently(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    assert shutdown_records(monkeypatch, caplog, _no_manager) == []


def test_redis_gone_at_shutdown_is_one_warning_without_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    sessions = _Sessions(redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."))
    (record,) = shutdown_records(monkeypatch, caplog, lambda: sessions)
    assert sessions.calls == 1
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage().startswith("worker.shutdown_incomplete ")
    assert "Redis unreachable" in record.getMessage() and "ECHOQ_LEASE_TTL_S" in record.getMessage()


def test_anything_else_still_logs_its_traceback(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    (record,) = shutdown_records(monkeypatch, caplog, lambda: _Sessions(RuntimeError("a bug")))
    assert record.levelno == logging.ERROR and record.exc_info is not None
