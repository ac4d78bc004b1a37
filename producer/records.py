"""Redis records as typed values: the one place where the strings Redis holds become numbers.

Redis hashes hold every field as a string. The client, and through it the CLI's ``--json``, the
HTTP API and its event stream, hand records out through these functions, so a count is an
``int``, a duration a ``float``, a flag a ``bool`` wherever a record is read.

Times are one form everywhere: **epoch seconds as a JSON number** (UTC, fractional), in every
field named ``*_at`` and in an event's ``ts``. Human output (``echoq show``, ``echoq status``)
prints them as ISO-8601 UTC with :func:`iso_utc`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = ["conversation_record", "utterance_record", "event_record", "iso_utc", "is_time_field"]

#: fields that are whole numbers wherever they appear
INT_FIELDS = frozenset({
    "seq", "chunk", "chunks_sent", "chunks_total", "chunks_estimate", "chars", "sample_rate", "source_rate",
    "channels", "messages", "interrupt_gen", "interrupt_upto", "upto", "cancelled", "backlog", "utterances",
})
#: fields that are real numbers (seconds) besides the times
FLOAT_FIELDS = frozenset({"duration", "duration_in"})
#: fields that are true or false
BOOL_FIELDS = frozenset({"interrupted", "duration_estimated"})


def is_time_field(name: str) -> bool:
    """Whether a field holds a time (epoch seconds): ``*_at`` and ``ts``."""
    return name.endswith("_at") or name == "ts"


def _number(value: Any, whole: bool) -> Any:
    """``value`` as a number (an ``int`` when ``whole`` and it is one); an empty or unparsable
    string is ``None``, so a record is never half typed."""
    if value is None or isinstance(value, bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if whole and number.is_integer() else number


def _bool(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    return None if not text else value


def typed(record: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``record`` with every known field converted to its type (unknown ones kept)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key in INT_FIELDS:
            out[key] = _number(value, whole=True)
        elif key in FLOAT_FIELDS or is_time_field(key):
            out[key] = _number(value, whole=False)
        elif key in BOOL_FIELDS:
            out[key] = _bool(value)
        elif isinstance(value, Mapping):
            out[key] = typed(value)
        else:
            out[key] = value
    return out


def utterance_record(raw: Mapping[str, Any]) -> dict[str, Any]:
    """An utterance record as read from Redis, typed."""
    return typed(raw)


def conversation_record(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A conversation record as read from Redis, typed."""
    return typed(raw)


def event_record(event: Mapping[str, Any]) -> dict[str, Any]:
    """A delivery or replica event, typed (the replica reports ``duration`` as it likes)."""
    return typed(event)


def iso_utc(epoch: float | None) -> str | None:
    """Epoch seconds as ISO-8601 UTC with milliseconds, e.g. ``2026-06-02T07:00:00.125Z``."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
