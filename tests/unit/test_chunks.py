"""Chunking: byte-exact re-cutting, last-item lookahead and the message-size check."""

from __future__ import annotations

import random
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker import audio
from worker.chunks import check_chunk_fits, chunk_bytes, mark_last, rechunk
from worker.errors import ConfigError
from worker.settings import Settings


def test_chunk_bytes_is_even_and_exact() -> None:
    assert chunk_bytes(24000, 40) == 1920
    assert chunk_bytes(16000, 40) == 1280
    assert chunk_bytes(24000, 1) == 48
    for rate in (16000, 24000):
        for ms in range(1, 200):
            assert chunk_bytes(rate, ms) % 2 == 0
    with pytest.raises(ValueError):
        chunk_bytes(24000, 0)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 640, 1920, 4096])
def test_rechunk_reassembles_byte_for_byte(size: int) -> None:
    rng = random.Random(size)
    pieces = [rng.randbytes(rng.choice([0, 1, 5, size - 1, size, size + 1, 3 * size + 2])) for _ in range(60)]
    chunks = list(rechunk(pieces, size))
    assert b"".join(chunks) == b"".join(pieces)
    assert all(chunks), "no empty chunk"
    assert all(len(c) == size for c in chunks[:-1])
    assert 0 < len(chunks[-1]) <= size


def test_rechunk_of_nothing_is_nothing() -> None:
    assert list(rechunk([], 4)) == []
    assert list(rechunk([b"", b""], 4)) == []
    with pytest.raises(ValueError):
        list(rechunk([b"x"], 0))


def test_mark_last() -> None:
    assert list(mark_last([])) == []
    assert list(mark_last(["a"])) == [("a", True)]
    assert list(mark_last("abc")) == [("a", False), ("b", False), ("c", True)]


def test_mark_last_looks_ahead_only_one_item() -> None:
    pulled: list[int] = []

    def source() -> Iterator[int]:
        for i in range(5):
            pulled.append(i)
            yield i

    marked = mark_last(source())
    assert next(marked) == (0, False)
    assert pulled == [0, 1]


def _wav(path: Path, seconds: float, rate: int = 44100) -> Path:
    n = int(seconds * rate)
    tone = 0.3 * np.sin(2 * np.pi * 523.0 * np.arange(n) / rate)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((tone * 32767).astype("<i2").tobytes())
    return path


@pytest.mark.parametrize("seconds", [0.3071, 1.013, 1.7771])
@pytest.mark.parametrize("target_rate", [16000, 24000])
def test_chunks_of_an_utterance_rebuild_its_pcm(tmp_path: Path, seconds: float, target_rate: int) -> None:
    src = _wav(tmp_path / "u.wav", seconds)
    limits: dict[str, Any] = {"max_bytes": 10**7, "max_seconds": 60.0}
    pcm = audio.convert(src, target_rate=target_rate, **limits)
    pieces = list(audio.pcm_stream(src, target_rate=target_rate, block_bytes=4096, **limits))
    assert len(pieces) > 3, "the stream must come in several uneven pieces"
    odd_tails = 0
    for ms in (10, 20, 40, 50, 60, 100, 333):
        size = chunk_bytes(target_rate, ms)
        marked = list(mark_last(rechunk(iter(pieces), size)))
        chunks = [c for c, _ in marked]
        assert b"".join(chunks) == pcm
        assert [last for _, last in marked] == [False] * (len(marked) - 1) + [True]
        assert all(len(c) == size for c in chunks[:-1])
        assert len(chunks[-1]) % 2 == 0
        odd_tails += len(pcm) % size != 0
    assert odd_tails >= 3, "some chunk sizes must leave a short last chunk"


def test_default_settings_fit_one_message() -> None:
    s = Settings()
    for rate in (16000, 24000):
        assert check_chunk_fits(s.chunk_ms, s.max_message_bytes, rate) <= s.max_message_bytes
    assert 2700 < check_chunk_fits(40, 4096) < 2900  # PROTOCOL.md: 40 ms at 24 kHz is about 2.8 KB


def test_chunk_too_long_for_a_message_is_a_config_error() -> None:
    assert check_chunk_fits(50, 4096) <= 4096
    with pytest.raises(ConfigError, match="chunk_ms=60"):
        check_chunk_fits(60, 4096)
    with pytest.raises(ConfigError, match="chunk_ms=100"):
        check_chunk_fits(100, 4096, sample_rate=16000)
