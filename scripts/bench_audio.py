"""Measure conversion quality and speed: SNR of tones resampled from 44.1 kHz, and decode time.

    .venv/bin/python scripts/bench_audio.py

SNR is against an ideal sine fitted at the output rate (filter edges excluded); for tones above
the output's Nyquist frequency it is the level left after filtering, relative to the input.
"""

from __future__ import annotations

import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker import audio  # noqa: E402

MAX_BYTES, MAX_SECONDS = 1 << 30, 3600.0


def wav(path: Path, freq: float, rate: int = 44100, seconds: float = 1.0) -> Path:
    t = np.arange(int(rate * seconds)) / rate
    x = np.round(0.5 * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(x.tobytes())
    return path


def measure(src: Path, freq: float, rate: int) -> float:
    y = (
        np.frombuffer(
            audio.convert(src, target_rate=rate, max_bytes=MAX_BYTES, max_seconds=MAX_SECONDS), "<i2"
        )
        / 32768
    )
    edge = rate // 10
    y = y[edge:-edge]
    if freq >= rate / 2:
        return 20 * np.log10((0.5 / np.sqrt(2)) / max(float(np.sqrt(np.mean(y**2))), 1e-12))
    t = (np.arange(len(y)) + edge) / rate
    basis = np.column_stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)])
    fit = basis @ np.linalg.lstsq(basis, y, rcond=None)[0]
    return float(10 * np.log10(np.sum(fit**2) / np.sum((y - fit) ** 2)))


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        for quality in ("HQ", "VHQ"):
            audio.QUALITY = quality
            for rate in (24000, 16000):
                cells = [
                    f"{f / 1000:g} kHz {measure(wav(Path(d) / f'{f}.wav', f), f, rate):6.1f} dB"
                    for f in (1000, 7000, 10000)
                ]
                print(f"soxr {quality:3} 44.1k -> {rate}: " + " | ".join(cells))
        long = wav(Path(d) / "long.wav", 440, seconds=300)
        start = time.perf_counter()
        stream = audio.pcm_stream(long, target_rate=24000, max_bytes=MAX_BYTES, max_seconds=MAX_SECONDS)
        first = len(next(stream))
        first_s = time.perf_counter() - start
        total = first + sum(len(piece) for piece in stream)
        print(
            f"300 s WAV at 44.1k -> 24k ({audio.QUALITY}): first block {first_s * 1000:.0f} ms, "
            f"{total / 48000:.1f} s of output in {time.perf_counter() - start:.2f} s"
        )


if __name__ == "__main__":
    main()
