"""worker.logs: one line per step, as text or as JSON lines, carrying only the fields given."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from worker.logs import setup_logging, step


@pytest.fixture
def echoq_logger() -> Iterator[logging.Logger]:
    """The ``echoq`` logger tree, restored afterwards."""
    root = logging.getLogger("echoq")
    saved = (root.handlers[:], root.level, root.propagate)
    yield logging.getLogger("echoq.test")
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def _json_lines(err: str) -> list[dict[str, object]]:
    lines = [line for line in err.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def test_json_lines_one_object_per_step(
    echoq_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("INFO", json_lines=True)
    step(echoq_logger, "utterance.sent", conversation_id="c1", utterance_id="u1", chunks=12, ms=84.25)
    step(echoq_logger, "session.joined", conversation_id="c1", url_kind="loopback")

    records = _json_lines(capsys.readouterr().err)
    assert len(records) == 2
    first, second = records
    assert first["step"] == "utterance.sent"
    assert first["level"] == "INFO"
    assert first["logger"] == "echoq.test"
    assert (first["conversation_id"], first["utterance_id"], first["chunks"], first["ms"]) == (
        "c1",
        "u1",
        12,
        84.25,
    )
    assert second["step"] == "session.joined"
    assert second["url_kind"] == "loopback"


def test_json_lines_carry_only_the_given_fields(
    echoq_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    """A step line holds its name, time, level, logger and the fields passed: no payload rides along."""
    setup_logging("INFO", json_lines=True)
    step(echoq_logger, "utterance.enqueued", conversation_id="c1", utterance_id="u1", kind="text", seq=4)

    (record,) = _json_lines(capsys.readouterr().err)
    assert set(record) == {"ts", "level", "logger", "step", "conversation_id", "utterance_id", "kind", "seq"}


def test_text_lines_carry_only_the_given_fields(
    echoq_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("INFO", json_lines=False)
    step(echoq_logger, "utterance.enqueued", utterance_id="u1", seq=4)
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert line.endswith("echoq.test utterance.enqueued utterance_id=u1 seq=4")


def test_none_fields_are_left_out(echoq_logger: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", json_lines=True)
    step(echoq_logger, "utterance.failed", utterance_id="u1", error=None)
    (record,) = _json_lines(capsys.readouterr().err)
    assert "error" not in record


def test_plain_messages_become_json_too(
    echoq_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("INFO", json_lines=True)
    echoq_logger.warning("lease lost for %s", "c1")
    (record,) = _json_lines(capsys.readouterr().err)
    assert record["message"] == "lease lost for c1"
    assert record["level"] == "WARNING"
    assert "step" not in record


def test_exceptions_stay_on_one_line(
    echoq_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("INFO", json_lines=True)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        echoq_logger.exception("send failed")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "RuntimeError: boom" in json.loads(lines[0])["exc"]


def test_text_format_is_one_line_with_key_values(
    echoq_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("INFO", json_lines=False)
    step(echoq_logger, "utterance.sent", conversation_id="c1", chunks=3, ms=12.345, note="two words")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].endswith('utterance.sent conversation_id=c1 chunks=3 ms=12.3 note="two words"')


def test_level_filters_steps(echoq_logger: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("WARNING", json_lines=True)
    step(echoq_logger, "chunk.sent", seq=1)
    step(echoq_logger, "send.retry", level=logging.WARNING, seq=1, attempt=2)
    records = _json_lines(capsys.readouterr().err)
    assert [r["step"] for r in records] == ["send.retry"]
