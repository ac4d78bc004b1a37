"""Cutting converted PCM into echo-message chunks. Pure: no I/O.

The sender streams an utterance through :func:`rechunk` and :func:`mark_last`, so it can set
``done`` on the last chunk without holding the whole utterance in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from .echo import audio_echo, encode
from .errors import ConfigError, MessageTooLarge

T = TypeVar("T")

# Worst-case id lengths for the size check: a uuid4 string is 36 characters, and 64 leaves room
# for any conversation id Tavus or the loopback transport hands out.
_INFERENCE_ID_LEN = 36
_CONVERSATION_ID_LEN = 64


def chunk_bytes(sample_rate: int, chunk_ms: int) -> int:
    """Bytes of s16le mono PCM in ``chunk_ms`` milliseconds at ``sample_rate`` (always even)."""
    if sample_rate <= 0 or chunk_ms <= 0:
        raise ValueError(f"sample_rate and chunk_ms must be positive, not {sample_rate} and {chunk_ms}")
    samples = sample_rate * chunk_ms // 1000
    if samples < 1:
        raise ValueError(f"{chunk_ms} ms at {sample_rate} Hz is less than one sample")
    return samples * 2


def rechunk(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Re-cut ``pieces`` into chunks of exactly ``size`` bytes; the last may be shorter.

    Never yields an empty chunk, and the chunks joined are the pieces joined, byte for byte.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, not {size}")
    buf = bytearray()
    for piece in pieces:
        buf += piece
        whole = len(buf) - len(buf) % size
        for start in range(0, whole, size):
            yield bytes(buf[start : start + size])
        del buf[:whole]
    if buf:
        yield bytes(buf)


def mark_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Each item with a flag that is true only for the last one (one item of lookahead)."""
    it = iter(items)
    try:
        held = next(it)
    except StopIteration:
        return
    for item in it:
        yield held, False
        held = item
    yield held, True


def check_chunk_fits(chunk_ms: int, max_message_bytes: int, sample_rate: int = 24000) -> int:
    """Raise :class:`ConfigError` unless an audio echo with a full chunk fits one message.

    Checked with worst-case ids and ``done`` false (one byte longer than true). Returns the
    size in bytes of that largest message.
    """
    pcm = b"\0" * chunk_bytes(sample_rate, chunk_ms)
    try:
        message = audio_echo(
            "c" * _CONVERSATION_ID_LEN,
            pcm,
            sample_rate,
            "i" * _INFERENCE_ID_LEN,
            False,
            max_bytes=max_message_bytes,
        )
    except MessageTooLarge as exc:
        raise ConfigError(
            f"chunk_ms={chunk_ms} at {sample_rate} Hz ({len(pcm)} bytes of PCM) does not fit one "
            f"app message: {exc}; lower chunk_ms or raise max_message_bytes"
        ) from exc
    return len(encode(message))


def progress_text(sent: int, total: int | None, estimate: int | None = None) -> str:
    """Chunks sent so far, for people: ``12/75`` when the total is known, ``12/~75`` while it is
    only estimated (from the input's duration), ``12`` once more were sent than estimated. A
    total shown is never below the count."""
    if total is not None and sent <= total:
        return f"{sent}/{total}"
    if estimate is not None and sent < estimate:
        return f"{sent}/~{estimate}"
    return str(sent)
