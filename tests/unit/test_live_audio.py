"""Converting audio piece by piece: byte for byte what converting it whole gives, however it is cut."""

from __future__ import annotations

import io
import subprocess
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from worker import audio
from worker.errors import AudioError
from worker.live_audio import EncodedPieces, PcmPieces

LIMITS = {"max_bytes": 1 << 30, "max_seconds": 600.0}


def tone(seconds: float, rate: int, channels: int = 1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.4 * 32767 * np.sin(2 * np.pi * 523 * t) * np.linspace(0.3, 1, t.size)).astype("<i2")
    return np.repeat(mono[:, None], channels, axis=1).tobytes()


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    out, i, k = [], 0, 0
    while i < len(data):
        out.append(data[i : i + sizes[k % len(sizes)]])
        i += sizes[k % len(sizes)]
        k += 1
    return out


def run(conv: PcmPieces | EncodedPieces, pieces: list[bytes]) -> bytes:
    try:
        return b"".join(conv.feed(p) for p in pieces) + conv.flush()
    finally:
        conv.close()


def test_mono_pcm_at_the_target_rate_passes_through_piece_for_piece() -> None:
    pcm = tone(0.3, 24000)
    conv = PcmPieces(24000, 1, 24000)
    assert [conv.feed(p) for p in cut(pcm, [960])] == cut(pcm, [960])
    assert conv.flush() == b""


@pytest.mark.parametrize(("rate", "channels"), [(16000, 1), (44100, 2), (24000, 2), (48000, 1)])
def test_resampled_pieces_equal_the_whole_conversion_however_they_are_cut(rate: int, channels: int) -> None:
    raw = tone(0.5, rate, channels)
    whole = audio.convert(raw, target_rate=24000, format="raw", source_rate=rate, channels=channels, **LIMITS)
    frame = 2 * channels
    for sizes in ([frame * 160], [frame * 7, frame * 331, frame]):
        assert run(PcmPieces(rate, channels, 24000), cut(raw, sizes)) == whole


def test_a_piece_that_splits_a_frame_is_refused() -> None:
    with pytest.raises(AudioError, match="not whole s16le frames"):
        PcmPieces(24000, 2, 24000).feed(b"\0" * 6)


def test_encoded_pieces_give_whole_blocks_that_do_not_depend_on_the_cuts() -> None:
    pcm = tone(0.4, 24000)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(pcm)
    data = buf.getvalue()
    outputs = []
    for sizes in ([len(data)], [1000], [17, 4096, 333]):
        conv = EncodedPieces(24000, 1920)
        blocks = [conv.feed(p) for p in cut(data, sizes)]
        assert all(len(b) % 1920 == 0 for b in blocks)
        outputs.append(b"".join(blocks) + conv.flush())
        conv.close()
    assert outputs[0] == outputs[1] == outputs[2] == pcm


def test_undecodable_pieces_fail_with_a_clear_error() -> None:
    conv = EncodedPieces(24000, 1920)
    try:
        conv.feed(b"certainly not audio" * 100)
        with pytest.raises(AudioError, match="unreadable"):
            conv.flush()
    finally:
        conv.close()


def test_an_mp3_is_decoded_while_its_pieces_still_come(tmp_path: Path) -> None:
    mp3 = tmp_path / "t.mp3"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=3",
                    "-ar", "44100", "-ac", "2", str(mp3)], check=True)
    data = mp3.read_bytes()
    conv = EncodedPieces(24000, 1920)
    try:
        got = b"".join(conv.feed(p) for p in cut(data[: len(data) // 3], [2000]))
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:  # ffmpeg answers on its own schedule
            time.sleep(0.01)
            got += conv.ready()
        assert got, "no audio while the first third of the mp3 was in"
        got += b"".join(conv.feed(p) for p in cut(data[len(data) // 3 :], [2000])) + conv.flush()
    finally:
        conv.close()
    assert abs(len(got) / 48000 - 3.0) < 0.1  # all of it: 3 s at 24 kHz
