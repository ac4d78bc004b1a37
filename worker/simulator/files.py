"""What the replica simulator writes to disk: WAV, text and JSON files, each replaced atomically.

Every write goes to a temporary file in the target's directory and is then renamed over the
target, so a reader (a test, a person with a player open) never sees half a file.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import wave
from pathlib import Path
from typing import Any

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(name: str) -> str:
    """``name`` as one path component: unsafe characters become ``_``, no leading dot."""
    cleaned = _UNSAFE.sub("_", name).lstrip(".")
    return cleaned or "_"


def _replace(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o644)  # mkstemp makes 0600; these are meant to be shared
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_wav(path: Path, pcm: bytes, sample_rate: int) -> None:
    """Write s16le mono ``pcm`` as a WAV file."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm)
    _replace(path, buf.getvalue())


def write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8."""
    _replace(path, text.encode("utf-8"))


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON."""
    _replace(path, json.dumps(value, indent=2, sort_keys=False).encode("utf-8") + b"\n")
