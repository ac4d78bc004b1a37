"""The bad-input corpus: media generated with ffmpeg and numpy, then broken on purpose.

Nothing here is a stored blob: every file is made from a tone when the corpus is built, so a
reader can see exactly what each case is. :func:`media_cases` gives ``(name, bytes, format,
expect)`` where ``expect`` is ``"refused:<regex>"`` (the producer refuses it at enqueue, naming
why: its header bytes show it), ``"failed:<regex>"`` (its header passes the producer's check,
and the worker, decoding it, fails the utterance with that reason), ``"played"`` (it is spoken
whole) or ``"noted"`` (it is spoken as far as it decodes and the record carries a
``decode_note``).
"""

from __future__ import annotations

import random
import struct
import subprocess
from pathlib import Path

import numpy as np

#: the formats echoq documents, with the ffmpeg codec that writes each
FORMATS = {"wav": "pcm_s16le", "mp3": "libmp3lame", "ogg": "libvorbis", "flac": "flac", "m4a": "aac", "webm": "libopus"}
#: what a truncated file of each format does with this corpus's ffmpeg (half the bytes kept)
TRUNCATED = {"wav": "noted", "mp3": "noted", "flac": "noted", "webm": "noted",
             "ogg": "refused:unreadable", "m4a": "refused:unreadable"}

Case = tuple[str, bytes, str | None, str]

#: the cases :func:`media_cases` makes, in order (known without running ffmpeg, for parametrizing)
MEDIA_NAMES = [f"{ext}-{kind}" for ext in FORMATS for kind in ("truncated", "corrupt", "zero-length")] + [
    "wav-named-mp3", "mp3-named-wav", "text-named-wav", "webm-header-says-0.5s-holds-more",
    "wav-length-says-huge-holds-0.5s", "wav-length-says-huge-holds-more", "wav-rate-says-1-hz", "wav-rate-says-4-ghz",
    "wav-rate-says-8-khz-for-24-khz", "wav-0-channels", "wav-1000-channels", "wav-8-bit", "wav-float", "flac-48-khz",
    "wav-6-channels", "mp3-exactly-the-limit"]


def encode(tmp: Path, ext: str, seconds: float = 1.0, rate: int = 48000, channels: int = 1,
           sample_fmt: str | None = None) -> bytes:
    """A ``seconds`` long 440 Hz tone encoded as ``ext``."""
    out = tmp / f"tone-{seconds}-{rate}-{channels}-{sample_fmt}.{ext}"
    args = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi",
            "-i", f"sine=frequency=440:duration={seconds}:sample_rate={rate}", "-ac", str(channels)]
    if ext == "wav":
        args += ["-c:a", {None: "pcm_s16le", "u8": "pcm_u8", "flt": "pcm_f32le"}[sample_fmt]]
    else:
        args += ["-c:a", FORMATS[ext]]
    subprocess.run([*args, str(out)], check=True, timeout=60)
    return out.read_bytes()


def wav_header(data_len: int, rate: int = 24000, channels: int = 1, bits: int = 16, fmt: int = 1) -> bytes:
    """A RIFF/WAVE header whose every field is what the caller says, true or not."""
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", min(36 + data_len, 0xFFFFFFFF)) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, fmt, channels, rate, (rate * block) & 0xFFFFFFFF, block, bits)
            + b"data" + struct.pack("<I", data_len))


def pcm(seconds: float, rate: int = 24000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()


def lying_webm(tmp: Path, holds_s: float, claims_s: float) -> bytes:
    """A WebM holding ``holds_s`` seconds whose Duration element claims ``claims_s``."""
    data = encode(tmp, "webm", holds_s)
    at = data.find(b"\x44\x89\x88")  # the Duration element: id 0x4489, an 8-byte float of milliseconds
    assert at > 0, "no Duration element in the WebM ffmpeg wrote"
    return data[:at + 3] + struct.pack(">d", claims_s * 1000) + data[at + 11:]


def media_cases(tmp: Path, max_seconds: float) -> list[Case]:
    """Every media case, for a producer whose limit is ``max_seconds`` (at least 1.5 s)."""
    rng = random.Random(12)
    cases: list[Case] = []
    for ext in FORMATS:
        good = encode(tmp, ext)
        cases.append((f"{ext}-truncated", good[: len(good) // 2], ext, TRUNCATED[ext]))
        corrupt = good[:64] + bytes(rng.getrandbits(8) for _ in range(len(good) - 64))
        cases.append((f"{ext}-corrupt", corrupt, ext, "refused:unreadable|empty"))
        cases.append((f"{ext}-zero-length", b"", ext, "refused:empty"))
    over = max_seconds + 1.0
    cases += [
        ("wav-named-mp3", encode(tmp, "wav"), "mp3", "played"),
        ("mp3-named-wav", encode(tmp, "mp3"), "wav", "played"),
        ("text-named-wav", b"this is not audio at all\n" * 40, "wav", "refused:unreadable|not audio"),
        # nothing but decoding finds this one out: the worker stops at the limit, mid-utterance
        ("webm-header-says-0.5s-holds-more", lying_webm(tmp, over, 0.5), "webm", "failed:longer than the limit"),
        ("wav-length-says-huge-holds-0.5s", wav_header(0xFFFFFFF0) + pcm(0.5), "wav", "played"),
        ("wav-length-says-huge-holds-more", wav_header(0xFFFFFFF0) + pcm(over), "wav", "refused:longer than the limit"),
        ("wav-rate-says-1-hz", wav_header(9600, rate=1) + pcm(0.2), "wav", "refused:longer than the limit"),
        ("wav-rate-says-4-ghz", wav_header(9600, rate=4_000_000_000) + pcm(0.2), "wav", "refused:unreadable"),
        ("wav-rate-says-8-khz-for-24-khz", wav_header(48000, rate=8000) + pcm(1.0), "wav",
         "refused:longer than the limit"),
        ("wav-0-channels", wav_header(9600, channels=0) + pcm(0.2), "wav", "refused:unreadable"),
        ("wav-1000-channels", wav_header(96000, channels=1000) + pcm(2.0), "wav", "refused:unreadable"),
        ("wav-8-bit", encode(tmp, "wav", 0.5, 16000, sample_fmt="u8"), "wav", "played"),
        ("wav-float", encode(tmp, "wav", 0.5, 24000, sample_fmt="flt"), "wav", "played"),
        ("flac-48-khz", encode(tmp, "flac", 0.5, 48000), "flac", "played"),
        ("wav-6-channels", encode(tmp, "wav", 0.5, 48000, channels=6), "wav", "played"),
        ("mp3-exactly-the-limit", encode(tmp, "mp3", max_seconds, 44100), "mp3", "played"),
    ]
    return cases
