"""Scripts: what a replica says, in which conversation, and when. Pure: parsing and validation only.

A script is YAML or JSON::

    name: morning-welcome              # optional
    conversation: conv-123             # an open echoq conversation ...
    # conversation: {persona_id: p1, replica_id: r1, name: "Morning"}   # ... or a new Tavus one
    lines:
      - text: "Good morning!"
        pause: 3s                      # wait this long after the line is sent
      - audio: clips/hello.wav         # a path (relative to the script) or an http(s) URL
        sample_rate: 24000             # 16000 or 24000 (audio only)
      - text: "Thirty seconds in."
        at: 30s                        # offset from the start of the run

Durations are seconds (a number) or a string with a unit: ``500ms``, ``3s``, ``2m``, ``1h``.

Timing rules: a line without ``at`` goes out once the line before it has been *sent* (every
message acknowledged by the room) plus that line's ``pause``; the first line goes out at the
start. A line with ``at`` goes out ``at`` after the start of the run, and never before the line
before it has been queued, so order holds. ``at`` offsets must not go backwards, and a line
followed by an ``at`` line cannot have a ``pause`` (the offset decides).

Everything is checked up front: :func:`parse_script` raises one :class:`ScriptError` listing
every problem, each naming the script line (1-based) and the field, plus the source file line
for YAML. An audio URL is checked as the fetch policy would check it (:func:`producer.fetch.check`:
its form, and no internal address unless allowed), without fetching it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from worker import echo, keys
from worker.errors import InvalidInput, TextTooLong
from worker.settings import SAMPLE_RATES
from worker.text import text_problem

#: the longest pause or offset a script may ask for
MAX_DELAY_S = 24 * 3600.0
#: the most lines one script may hold
MAX_LINES = 1000

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_TARGET_KEYS = {"id", "persona_id", "replica_id", "name", "properties"}
_LINE_KEYS = {"text", "audio", "sample_rate", "pause", "at"}
_TOP_KEYS = {"name", "conversation", "lines"}
# Room left for the ids on a text message when the conversation is not known yet: run and
# schedule utterance ids stay well under this.
_ID_ROOM = "x" * 128


#: the field of a problem that is the file's syntax (YAML or JSON) rather than a script field
SYNTAX = "syntax"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a script: which line (1-based; None for the script itself) and field."""

    line: int | None
    field: str
    message: str
    source_line: int | None = None
    source_column: int | None = None

    def __str__(self) -> str:
        at = None
        if self.source_line is not None:
            column = f", column {self.source_column}" if self.source_column is not None else ""
            at = f"file line {self.source_line}{column}"
        where = (f"line {self.line}" + (f" ({at})" if at else "")) if self.line is not None else (at or "script")
        # a syntax error belongs to the file as a whole: no field to name
        return f"{where}: {self.message}" if self.field == SYNTAX else f"{where}: {self.field}: {self.message}"


class ScriptError(InvalidInput):
    """A script that cannot run; ``problems`` lists every reason, each naming line and field."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        text = "; ".join(str(p) for p in problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        super().__init__(f"{source}: {text}{more}")


@dataclass(frozen=True)
class Target:
    """Where a script speaks: an open echoq conversation, or a Tavus conversation made at run time."""

    conversation_id: str | None = None
    persona_id: str | None = None
    replica_id: str | None = None
    name: str | None = None
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def creates_conversation(self) -> bool:
        return self.conversation_id is None


@dataclass(frozen=True)
class Line:
    """One utterance of a script. ``number`` is 1-based; exactly one of text and audio is set."""

    number: int
    text: str | None = None
    audio: str | None = None
    sample_rate: int | None = None
    pause_s: float = 0.0
    at_s: float | None = None

    @property
    def kind(self) -> str:
        return "text" if self.text is not None else "audio"


@dataclass(frozen=True)
class Script:
    """A validated script. :meth:`to_dict` and :func:`parse_script` round-trip it."""

    target: Target
    lines: tuple[Line, ...]
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The script as plain data (audio paths absolute), as stored with a schedule."""
        target = {k: v for k, v in asdict(self.target).items() if v not in (None, {})}
        conv: Any = target.pop("conversation_id", None)
        if conv is not None:
            target["id"] = conv
        lines = []
        for ln in self.lines:
            d: dict[str, Any] = {"text": ln.text} if ln.text is not None else {"audio": ln.audio}
            if ln.sample_rate is not None:
                d["sample_rate"] = ln.sample_rate
            if ln.pause_s:
                d["pause"] = ln.pause_s
            if ln.at_s is not None:
                d["at"] = ln.at_s
            lines.append(d)
        out: dict[str, Any] = {"conversation": target, "lines": lines}
        if self.name:
            out["name"] = self.name
        return out

    def with_conversation(self, conversation_id: str) -> Script:
        """The same script aimed at an existing conversation (``--conversation``)."""
        _check_conversation_id(conversation_id)
        return Script(Target(conversation_id=conversation_id), self.lines, self.name)


# loading -------------------------------------------------------------------------------------


def load_script(path: str | Path, *, check_audio: bool = True) -> Script:
    """Read and validate a YAML (``.yaml``/``.yml``) or JSON (``.json``) script file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScriptError(str(p), [Problem(None, "file", f"cannot read it: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ScriptError(str(p), [Problem(None, "file", f"is not UTF-8 text (byte {exc.start})")]) from exc
    return parse_text(text, source=str(p), base_dir=p.resolve().parent,
                      fmt="json" if p.suffix.lower() == ".json" else "yaml", check_audio=check_audio)


def parse_text(text: str, *, source: str = "<script>", base_dir: Path | None = None, fmt: str = "yaml",
               check_audio: bool = True) -> Script:
    """Parse script text (YAML, or JSON with ``fmt="json"``) and validate it."""
    marks: dict[tuple[int | None, str], int] = {}
    try:
        if fmt == "json":
            data = json.loads(text)
        else:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
            marks = _line_marks(node)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ScriptError(source, [_syntax_problem(exc, fmt)]) from exc
    return parse_script(data, source=source, base_dir=base_dir, source_lines=marks, check_audio=check_audio)


def parse_script(data: Any, *, source: str = "<script>", base_dir: Path | None = None,
                 source_lines: Mapping[tuple[int | None, str], int] | None = None, check_audio: bool = True) -> Script:
    """Validate plain data (as parsed from YAML or JSON) into a :class:`Script`.

    ``base_dir`` resolves relative audio paths; ``check_audio`` also checks that local audio
    files exist (a path that only exists on the workers can be passed with it off).
    ``source_lines`` maps ``(script line or None, field)`` to the file line it was read from
    (``(n, "")`` is where line ``n`` starts), so each problem can point at its field.
    """
    bad = _Problems(dict(source_lines or {}))
    if not isinstance(data, dict):
        raise ScriptError(source, [Problem(None, "script", "must be a mapping with 'conversation' and 'lines'")])
    for key in sorted(set(data) - _TOP_KEYS):
        bad(None, str(key), f"unknown field (expected one of {', '.join(sorted(_TOP_KEYS))})")
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        bad(None, "name", "must be a string")
    target = _target(data.get("conversation"), bad)
    raw_lines = data.get("lines")
    lines: list[Line] = []
    if not isinstance(raw_lines, list) or not raw_lines:
        bad(None, "lines", "must be a non-empty list")
    elif len(raw_lines) > MAX_LINES:
        bad(None, "lines", f"has {len(raw_lines)} lines, more than {MAX_LINES}")
    else:
        for n, raw in enumerate(raw_lines, start=1):
            line = _line(n, raw, base_dir, check_audio, target, bad)
            if line is not None:
                lines.append(line)
        _check_timing(lines, bad)
    if bad.problems:
        raise ScriptError(source, bad.problems)
    assert target is not None
    return Script(target, tuple(lines), name)


class _Problems:
    """Collects problems; called as ``bad(line, field, message)``."""

    def __init__(self, source_lines: dict[tuple[int | None, str], int]) -> None:
        self.source_lines = source_lines
        self.problems: list[Problem] = []

    def __call__(self, line: int | None, fld: str, message: str) -> None:
        self.problems.append(Problem(line, fld, message, self.file_line(line, fld)))

    def file_line(self, line: int | None, fld: str) -> int | None:
        """The file line of the field itself when known, else of the part it belongs to: the
        script line's start, or the top-level key (``conversation`` for ``conversation.id``)."""
        found = self.source_lines.get((line, fld))
        if found is None and line is None and "." in fld:
            found = self.source_lines.get((None, fld.split(".", 1)[0]))
        if found is None and line is not None:
            found = self.source_lines.get((line, ""))
        return found


# fields --------------------------------------------------------------------------------------


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as ``500ms``, ``3s``, ``2m``, ``1h``; ValueError if bad."""
    if isinstance(value, bool):
        raise ValueError("must be a duration, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"must be seconds or a duration such as '500ms', '3s', '2m', not {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"must be zero or more, not {value!r}")
    if seconds > MAX_DELAY_S:
        raise ValueError(f"must be at most {MAX_DELAY_S:.0f}s, not {value!r}")
    return seconds


def _target(raw: Any, bad: _Problems) -> Target | None:
    if isinstance(raw, str):
        raw = {"id": raw}
    if not isinstance(raw, dict):
        bad(None, "conversation", "must be a conversation id, or a mapping with 'id' or 'persona_id'")
        return None
    for key in sorted(set(raw) - _TARGET_KEYS):
        bad(None, f"conversation.{key}", f"unknown field (expected one of {', '.join(sorted(_TARGET_KEYS))})")
    conv, persona = raw.get("id"), raw.get("persona_id")
    if (conv is None) == (persona is None):
        bad(None, "conversation", "give exactly one of 'id' (an open conversation) or 'persona_id' (create one)")
        return None
    if conv is not None:
        try:
            _check_conversation_id(conv)
        except InvalidInput as exc:
            bad(None, "conversation.id", str(exc))
        extra = sorted(set(raw) & {"replica_id", "name", "properties"})
        if extra:
            bad(None, "conversation", f"{', '.join(extra)} only go with 'persona_id'")
        return Target(conversation_id=conv)
    ok = True
    for key in ("persona_id", "replica_id", "name"):
        v = raw.get(key)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            bad(None, f"conversation.{key}", "must be a non-empty string")
            ok = False
        elif key == "name" and v is not None and (problem := text_problem(v)) is not None:
            bad(None, "conversation.name", problem)  # the conversation_name Tavus is sent
            ok = False
    props = raw.get("properties") or {}
    if not isinstance(props, dict):
        bad(None, "conversation.properties", "must be a mapping")
        ok = False
    if not ok:
        return None
    return Target(persona_id=persona, replica_id=raw.get("replica_id"), name=raw.get("name"), properties=dict(props))


def _line(n: int, raw: Any, base_dir: Path | None, check_audio: bool, target: Target | None, bad: _Problems) -> Line | None:
    if isinstance(raw, str):
        raw = {"text": raw}
    if not isinstance(raw, dict):
        bad(n, "line", "must be a mapping with 'text' or 'audio' (or a plain string of text)")
        return None
    before = len(bad.problems)
    for key in sorted(set(raw) - _LINE_KEYS):
        bad(n, str(key), f"unknown field (expected one of {', '.join(sorted(_LINE_KEYS))})")
    text, audio_ref = raw.get("text"), raw.get("audio")
    if (text is None) == (audio_ref is None):
        bad(n, "text/audio", "give exactly one of 'text' or 'audio'")
    elif text is not None:
        if not isinstance(text, str) or not text.strip():
            bad(n, "text", "must be non-empty text")
        elif (problem := text_problem(text)) is not None:
            bad(n, "text", problem)
        else:
            conv = target.conversation_id if target and target.conversation_id else _ID_ROOM
            try:
                echo.text_echo(conv, text, _ID_ROOM, max_bytes=_max_message_bytes())
            except TextTooLong as exc:
                bad(n, "text", str(exc))
        if raw.get("sample_rate") is not None:
            bad(n, "sample_rate", "only applies to audio lines")
    else:
        audio_ref = _audio_ref(n, audio_ref, base_dir, check_audio, bad)
    rate = raw.get("sample_rate")
    if rate is not None and (isinstance(rate, bool) or rate not in SAMPLE_RATES):
        bad(n, "sample_rate", f"must be 16000 or 24000, not {rate!r}")
    pause, at = 0.0, None
    for key in ("pause", "at"):
        if raw.get(key) is None:
            continue
        try:
            value = parse_duration(raw[key])
        except ValueError as exc:
            bad(n, key, str(exc))
            continue
        if key == "pause":
            pause = value
        else:
            at = value
    if len(bad.problems) > before:
        return None
    return Line(n, text=text, audio=audio_ref if text is None else None, sample_rate=rate, pause_s=pause, at_s=at)


def _audio_ref(n: int, ref: Any, base_dir: Path | None, check: bool, bad: _Problems) -> str | None:
    if not isinstance(ref, str) or not ref.strip():
        bad(n, "audio", "must be a file path or an http(s) URL")
        return None
    if ref.startswith(("http://", "https://")):
        # refused now rather than when the line comes up in a run; ``check`` also resolves the host
        try:
            _check_url(ref, resolve=check)
        except InvalidInput as exc:
            bad(n, "audio", str(exc))
            return None
        return ref
    if "://" in ref:
        bad(n, "audio", f"only http(s) URLs or file paths, not {ref!r}")
        return None
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if check and not path.is_file():
        bad(n, "audio", f"no such file: {path}")
        return None
    return str(path)


def _check_timing(lines: list[Line], bad: _Problems) -> None:
    last_at: float | None = None
    for prev, line in zip([None, *lines[:-1]], lines, strict=False):
        if line.at_s is None:
            continue
        if last_at is not None and line.at_s < last_at:
            bad(line.number, "at", f"{line.at_s:g}s is before the offset of an earlier line ({last_at:g}s)")
        last_at = line.at_s
        if prev is not None and prev.pause_s and prev.number == line.number - 1:
            bad(prev.number, "pause", f"has no effect: line {line.number} has an offset ('at')")


def _check_conversation_id(conversation_id: Any) -> None:
    if not isinstance(conversation_id, str) or not keys.CONVERSATION_ID_RE.match(conversation_id):
        raise InvalidInput(f"conversation id must be 1-128 letters, digits, '.', '_' or '-', not {conversation_id!r}")


def _check_url(url: str, *, resolve: bool) -> None:
    """The fetch policy's refusals that need no fetch (:func:`producer.fetch.check`)."""
    from worker.settings import get_settings

    from .. import fetch

    settings = get_settings()
    fetch.check(url, allow=fetch.AllowList.parse(settings.fetch_allow_hosts), resolve=resolve,
                deadline_s=min(settings.fetch_timeout_s, 5.0))


def _max_message_bytes() -> int:
    from worker.settings import get_settings

    return get_settings().max_message_bytes


def _line_marks(node: Any) -> dict[tuple[int | None, str], int]:
    """``(script line or None, field)`` -> 1-based file line, from a composed YAML node: every
    top-level key, every ``conversation`` field, where each script line starts and each of its fields."""
    marks: dict[tuple[int | None, str], int] = {}
    if not isinstance(node, yaml.MappingNode):
        return marks
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode):
            continue
        marks[(None, key.value)] = key.start_mark.line + 1
        if key.value == "conversation" and isinstance(value, yaml.MappingNode):
            for sub, _v in value.value:
                if isinstance(sub, yaml.ScalarNode):
                    marks[(None, f"conversation.{sub.value}")] = sub.start_mark.line + 1
        if key.value == "lines" and isinstance(value, yaml.SequenceNode):
            for n, item in enumerate(value.value, start=1):
                marks[(n, "")] = item.start_mark.line + 1
                if isinstance(item, yaml.MappingNode):
                    for field_key, _v in item.value:
                        if isinstance(field_key, yaml.ScalarNode):
                            marks[(n, field_key.value)] = field_key.start_mark.line + 1
    return marks


def _syntax_problem(exc: Exception, fmt: str) -> Problem:
    """What the parser found wrong and where (file line and column), not only what it was doing:
    YAML's message starts with its context ("while parsing a block mapping"), its problem follows."""
    if isinstance(exc, json.JSONDecodeError):
        return Problem(None, SYNTAX, f"not valid JSON: {exc.msg}", exc.lineno, exc.colno)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    what = " ".join(p for p in (problem, f"({context})" if context else None) if p) or type(exc).__name__
    if problem and ("expected <block end>" in problem or "not allowed here" in problem):
        what += "; check the indentation of this line and the one before"
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
    return Problem(None, SYNTAX, f"not valid {fmt.upper()}: {what}", line, column)
