"""Logging: one line per lifecycle step, with ids and durations; text or JSON lines.

Never log payloads (text, audio) or secrets: :func:`step` takes only the fields it is given,
and callers pass ids, counts and timings.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def step(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one lifecycle step: ``name key=value …``; the fields also ride on the record for JSON."""
    text = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None)
    logger.log(level, "%s %s", name, text, extra={"step": name, "fields": fields})


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    s = str(value)
    return f'"{s}"' if " " in s else s


def ms_since(t0: float) -> float:
    """Milliseconds since a ``time.monotonic()`` reading."""
    return (time.monotonic() - t0) * 1000.0


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, step, message and the step's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
        }
        step_name = getattr(record, "step", None)
        if step_name:
            out["step"] = step_name
            out.update({k: v for k, v in getattr(record, "fields", {}).items() if v is not None})
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged, not when logging was set up
    (a replaced stderr — a daemon's, a test's capture — must not leave a dangling stream)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Configure the ``echoq`` loggers (idempotent)."""
    handler = _Stderr()
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("echoq")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
