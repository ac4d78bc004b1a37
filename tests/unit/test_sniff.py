"""The producer's header check: what header bytes say about a file, without decoding it.

Test audio is made here with ffmpeg (from a tone) or written byte by byte; every expectation is
what ffmpeg itself decodes from the same file.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.badinput import pcm, wav_header
from worker import audio, sniff
from worker.errors import AudioError

LIMITS: dict[str, Any] = {"max_bytes": 50 * 1024 * 1024, "max_seconds": 600.0}


@cache
def encoders() -> str:
    return subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True).stdout


def tone(tmp: Path, name: str, *args: str, seconds: float = 1.0, rate: int = 44100, channels: int = 2) -> bytes:
    """A ``seconds`` long tone written by ffmpeg as ``name`` with output options ``args``."""
    codec = args[args.index("-c:a") + 1] if "-c:a" in args else None
    if codec and f" {codec} " not in encoders():
        pytest.skip(f"this ffmpeg has no {codec} encoder")
    out = tmp / name
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=frequency=440:duration={seconds}:sample_rate={rate}", "-ac", str(channels), *args, str(out)],
                   check=True, timeout=60)
    return out.read_bytes()


def decoded_seconds(data: bytes) -> float:
    ends: list[audio.Decoded] = []
    audio.convert(data, target_rate=24000, on_end=ends.append, **LIMITS)
    return ends[0].duration_s


CONTAINERS = {
    "wav": ("a.wav", ()),
    "mp3": ("a.mp3", ("-c:a", "libmp3lame")),
    "aac": ("a.aac", ("-c:a", "aac")),
    "ogg": ("a.ogg", ("-c:a", "libvorbis")),
    "opus": ("a.opus", ("-c:a", "libopus")),
    "flac": ("a.flac", ("-c:a", "flac")),
    "m4a": ("a.m4a", ("-c:a", "aac")),
    "webm": ("a.webm", ("-c:a", "libopus")),
    "aiff": ("a.aiff", ()),
    "au": ("a.au", ()),
}
FORMAT_NAMES = {"opus": "ogg", "m4a": "mp4"}


@pytest.mark.parametrize("kind", list(CONTAINERS))
def test_each_container_is_recognised_and_its_duration_read_from_the_header(tmp_path: Path, kind: str) -> None:
    name, args = CONTAINERS[kind]
    data = tone(tmp_path, name, *args, seconds=2.0)
    head = sniff.look(data)
    assert head.format == FORMAT_NAMES.get(kind, kind)
    assert head.channels == 2 and head.sample_rate == (48000 if kind in ("opus", "webm") else 44100)
    assert head.duration_s is not None and not head.estimated and head.trusted
    assert head.duration_s == pytest.approx(decoded_seconds(data), abs=0.05)


def test_an_mp3_without_a_xing_header_is_counted_or_estimated_from_its_bitrate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cbr = tone(tmp_path, "cbr.mp3", "-c:a", "libmp3lame", "-b:a", "128k", "-write_xing", "0", seconds=3.0)
    vbr_file = tmp_path / "vbr.mp3"  # a quiet tone, then loud noise: the bitrate climbs part-way
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
                    "-f", "lavfi", "-i", "anoisesrc=d=2:c=pink:r=44100:a=0.5", "-filter_complex",
                    "[0][1]concat=n=2:v=0:a=1", "-c:a", "libmp3lame", "-q:a", "2", "-write_xing", "0", str(vbr_file)],
                   check=True, timeout=60)
    vbr = vbr_file.read_bytes()
    for data in (cbr, vbr):  # short enough to walk every frame: a count
        head = sniff.look(data)
        assert not head.estimated and head.duration_s == pytest.approx(decoded_seconds(data), abs=0.1)
    monkeypatch.setattr(sniff, "_WALK", 20)  # too long to walk: the bitrate says
    head = sniff.look(cbr)
    assert head.estimated and head.trusted and head.duration_s == pytest.approx(3.0, abs=0.1)
    with pytest.raises(AudioError, match="longer than the limit: about 3.0"):
        audio.sniff(cbr, format="mp3", max_bytes=LIMITS["max_bytes"], max_seconds=2.5)
    head = sniff.look(vbr)  # the first frames' bitrate is far from the rest's: a guess, never refused on
    assert head.estimated and not head.trusted and head.duration_s is not None and head.duration_s > 3.5
    assert audio.sniff(vbr, format="mp3", max_bytes=LIMITS["max_bytes"], max_seconds=3.2) == head


def test_id3_tags_and_leading_junk_are_skipped(tmp_path: Path) -> None:
    mp3 = tone(tmp_path, "a.mp3", "-c:a", "libmp3lame", "-write_xing", "0", "-id3v2_version", "0")
    flac = tone(tmp_path, "a.flac", "-c:a", "flac")
    tag = b"ID3\x04\x00\x00" + bytes([0, 0, 0, 20]) + bytes(20)
    assert sniff.look(tag + flac).format == "flac"
    assert sniff.look(tag + mp3).duration_s == sniff.look(mp3).duration_s
    assert sniff.look(b"\x01\x02junk" * 50 + mp3).format == "mp3"


def test_wav_duration_is_what_the_data_holds(tmp_path: Path) -> None:
    assert sniff.look(wav_header(0xFFFFFFF0) + pcm(0.5)).duration_s == 0.5  # its length says more
    assert sniff.look(wav_header(48000) + pcm(2.0)).duration_s == 1.0  # its length says less
    stereo_u8 = tone(tmp_path, "u8.wav", "-c:a", "pcm_u8", rate=16000, seconds=0.5)
    assert sniff.look(stereo_u8).duration_s == 0.5


NOT_AUDIO = {
    "text": (b"this is not audio at all\n" * 40, "text \\(plain text\\)"),
    "html": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "text \\(HTML\\)"),
    "json": (b'{"error": "not found", "status": 404}', "text \\(JSON\\)"),
    "utf-16 text": ("hello, not audio".encode("utf-16"), "text"),
    "png": (b"\x89PNG\r\n\x1a\n" + bytes(100), "a PNG image"),
    "jpeg": (b"\xff\xd8\xff\xe0" + bytes(100), "a JPEG image"),
    "pdf": (b"%PDF-1.7\n" + bytes(100), "a PDF document"),
    "zip": (b"PK\x03\x04" + bytes(100), "a ZIP archive"),
    "zero bytes": (bytes(5000), "5000 zero bytes"),
    "webp": (b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(100), "a WebP image"),
}


@pytest.mark.parametrize("kind", list(NOT_AUDIO))
def test_what_is_clearly_not_audio_is_refused_saying_what_it_is(kind: str) -> None:
    data, what = NOT_AUDIO[kind]
    with pytest.raises(AudioError, match=f"not audio: the file (is|starts with) .*{what}"):
        sniff.look(data)


def test_an_executable_is_not_audio() -> None:
    with pytest.raises(AudioError, match=r"not audio: the file is an executable"):
        sniff.look(Path(sys.executable).resolve().read_bytes()[:4096])
    with pytest.raises(AudioError, match=r"not audio: the file is an executable \(Windows\)"):
        sniff.look(b"MZ\x90\x00" + bytes(200))


def test_a_video_without_sound_is_not_audio(tmp_path: Path) -> None:
    out = tmp_path / "v.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "color=c=red:s=16x16:d=0.2",
                    "-c:v", "mpeg4", str(out)], check=True, timeout=60)
    with pytest.raises(AudioError, match="not audio: the MP4 file has no audio track"):
        sniff.look(out.read_bytes())


def test_broken_headers_of_known_containers_are_unreadable(tmp_path: Path) -> None:
    flac = tone(tmp_path, "a.flac", "-c:a", "flac")
    ogg = tone(tmp_path, "a.ogg", "-c:a", "libvorbis")
    m4a = tone(tmp_path, "a.m4a", "-c:a", "aac")
    moov_last = m4a.find(b"moov") - 4
    cases = {
        "WAV without data": (wav_header(100)[:36] + b"LIST" + struct.pack("<I", 4) + b"INFO", "no data chunk"),
        "WAV without fmt": (b"RIFF\x00\x00\x00\x00WAVEdata\x04\x00\x00\x00\x00\x00\x00\x00", "no fmt chunk"),
        "FLAC cut in its metadata": (flac[:30], "ends inside its FLAC metadata"),
        "FLAC with noise after its metadata": (flac[:4] + bytes([0x80]) + flac[5:42] + b"\x00" * 100,
                                               "no FLAC frame follows"),
        "Ogg with a gap": (ogg[:58] + b"\x00" * 4 + ogg[58:], "Ogg pages do not follow each other"),
        "MP4 without moov": (m4a[:moov_last] if moov_last > 0 else m4a[:100], "no moov box"),
        "AIFF without COMM": (b"FORM\x00\x00\x00\x04AIFF", "no COMM chunk"),
        "RIFF that is not WAVE": (b"RIFF nonsense", "not WAVE"),
    }
    for name, (data, why) in cases.items():
        with pytest.raises(AudioError, match=f"audio is unreadable: .*{why}"):
            sniff.look(data)
            pytest.fail(name)


def test_unknown_binary_passes_with_no_duration_for_the_worker_to_decide() -> None:
    head = sniff.look(bytes(range(1, 256)) * 40)
    assert head.format == "unknown" and head.duration_s is None and not head.trusted
    assert audio.sniff(bytes(range(1, 256)) * 40, **LIMITS) == head


def test_over_the_limit_by_its_header_is_refused_with_the_padding_margin(tmp_path: Path) -> None:
    mp3 = tone(tmp_path, "a.mp3", "-c:a", "libmp3lame", seconds=2.0, channels=1)
    with pytest.raises(AudioError, match="longer than the limit: 2.00 s, over 1.5 s"):
        audio.sniff(mp3, format="mp3", max_bytes=LIMITS["max_bytes"], max_seconds=1.5)
    assert audio.sniff(mp3, format="mp3", max_bytes=LIMITS["max_bytes"], max_seconds=2.0 - audio.PADDING_S / 2)
    with pytest.raises(AudioError, match="audio is empty: no samples"):
        audio.sniff(wav_header(0), **LIMITS)
    with pytest.raises(AudioError, match="too large"):
        audio.sniff(mp3, format="mp3", max_bytes=100, max_seconds=600)


def test_the_check_starts_no_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [tone(tmp_path, name, *args) for name, args in CONTAINERS.values()]

    def no(*args: object, **kw: object) -> None:
        raise AssertionError("the header check started a process")

    monkeypatch.setattr(subprocess, "Popen", no)
    for data in files:
        assert audio.sniff(data, **LIMITS).duration_s is not None
