"""Records as a person reads them: aligned ``field  value`` lines, times in ISO-8601 UTC.

``--json`` prints the typed record itself (times as epoch seconds, see :mod:`producer.records`);
this is the text the same commands print without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..records import is_time_field, iso_utc

__all__ = ["record_text", "value_text"]

#: fields shown first, in this order; the rest follow alphabetically
_FIRST = ("id", "conversation_id", "kind", "mode", "state", "url", "owner", "backlog", "utterances", "cursor",
          "current_utterance", "error", "last_error")
_SECONDS = frozenset({"duration", "duration_in"})


def value_text(name: str, value: Any) -> str:
    """One field's value as text: ``-`` for none, ISO-8601 UTC for times, ``1.24 s`` for durations."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if is_time_field(name) and isinstance(value, int | float):
        return iso_utc(value) or "-"
    if name in _SECONDS and isinstance(value, int | float):
        return f"{value:.2f} s"
    if name == "cursor" and isinstance(value, Mapping):
        return f"utterance {value.get('seq', 0)} done, next chunk {value.get('chunk', 0)}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {value_text(str(k), v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(value_text(name, v) for v in value) or "-"
    return str(value)


def record_text(record: Mapping[str, Any]) -> str:
    """Every field of ``record`` on its own line, names aligned, the important ones first."""
    names = [n for n in _FIRST if n in record] + sorted(n for n in record if n not in _FIRST)
    width = max((len(n) for n in names), default=0)
    return "\n".join(f"{n.ljust(width)}  {value_text(n, record[n])}" for n in names)

