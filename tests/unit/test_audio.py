"""Audio conversion: quality, formats, streaming, limits, cleanup and determinism.

Test audio is made here: numpy writes WAVs, ffmpeg encodes the other formats into tmp_path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
import wave
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import IO, Any, TypedDict

import numpy as np
import pytest

from worker import audio
from worker.errors import AudioError
from worker.sniff import Header


class Limits(TypedDict):
    max_bytes: int
    max_seconds: float


LIMITS = Limits(max_bytes=50 * 1024 * 1024, max_seconds=600.0)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """Write int16 samples, shape (n,) or (n, channels), as a WAV."""
    frames = samples if samples.ndim == 2 else samples[:, np.newaxis]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames.astype("<i2").tobytes())
    return path


def tone(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.round(amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, "<i2").astype(np.float64) / 32768


@cache
def encoders() -> str:
    return subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True).stdout


def encode(src: Path, dst: Path, codec: str, *extra: str) -> Path:
    if f" {codec} " not in encoders():
        pytest.skip(f"this ffmpeg has no {codec} encoder")
    cmd = ["ffmpeg", "-v", "error", "-y", "-i", str(src), "-c:a", codec, *extra, str(dst)]
    subprocess.run(cmd, check=True)
    return dst


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen[bytes]]:
    """Every ffmpeg process the module starts."""
    procs: list[subprocess.Popen[bytes]] = []
    real = audio._spawn

    def spy(args: list[str], stderr: IO[bytes], stdin: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
        procs.append(real(args, stderr, stdin))
        return procs[-1]

    monkeypatch.setattr(audio, "_spawn", spy)
    return procs


@pytest.fixture
def tmpdir_for_audio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temp directory, so a leaked temp file would show."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def assert_reaped(proc: subprocess.Popen[bytes]) -> None:
    assert proc.returncode is not None, "ffmpeg was not waited for"
    if os.path.isdir("/proc"):
        assert not os.path.exists(f"/proc/{proc.pid}"), "ffmpeg is still running or a zombie"


# Quality --------------------------------------------------------------------------------------


def test_7khz_tone_to_24k_keeps_snr_above_80db(tmp_path: Path) -> None:
    src = write_wav(tmp_path / "t.wav", tone(7000, 44100, 1.0), 44100)
    y = samples(audio.convert(src, target_rate=24000, **LIMITS))
    assert len(y) == 24000
    y = y[2400:-2400]  # the filter's start and end transients
    t = (np.arange(len(y)) + 2400) / 24000
    basis = np.column_stack([np.sin(2 * np.pi * 7000 * t), np.cos(2 * np.pi * 7000 * t)])
    fit = basis @ np.linalg.lstsq(basis, y, rcond=None)[0]
    snr = 10 * np.log10(np.sum(fit**2) / np.sum((y - fit) ** 2))
    assert snr >= 80, f"SNR {snr:.1f} dB"
    assert abs(np.sqrt(2 * np.mean(fit**2)) - 0.5) < 0.01  # the tone keeps its level


def test_10khz_tone_to_16k_is_filtered_not_aliased(tmp_path: Path) -> None:
    x = tone(10000, 44100, 1.0)
    src = write_wav(tmp_path / "t.wav", x, 44100)
    y = samples(audio.convert(src, target_rate=16000, **LIMITS))
    assert len(y) == 16000
    rms_in = np.sqrt(np.mean((x / 32768) ** 2))
    rms_out = max(float(np.sqrt(np.mean(y[1600:-1600] ** 2))), 1e-12)
    assert 20 * np.log10(rms_in / rms_out) >= 60


# Formats ---------------------------------------------------------------------------------------

FORMATS = [
    ("wav", "pcm_s16le", ()),
    ("mp3", "libmp3lame", ()),
    ("ogg", "libvorbis", ()),
    ("opus", "libopus", ()),
    ("flac", "flac", ()),
    ("m4a", "aac", ()),
    ("aac", "aac", ()),
    ("webm", "libopus", ()),
]


@pytest.fixture(scope="module")
def stereo_440(tmp_path_factory: pytest.TempPathFactory) -> Path:
    left = tone(440, 44100, 1.0, 0.4)
    return write_wav(tmp_path_factory.mktemp("src") / "s.wav", np.column_stack([left, left]), 44100)


@pytest.mark.parametrize(("ext", "codec", "extra"), FORMATS, ids=[f[0] for f in FORMATS])
def test_each_format_decodes_from_bytes(
    tmp_path: Path, stereo_440: Path, ext: str, codec: str, extra: tuple[str, ...]
) -> None:
    data = encode(stereo_440, tmp_path / f"a.{ext}", codec, *extra).read_bytes()
    head = audio.sniff(data, format=ext, **LIMITS)  # the header alone says it
    assert head.channels == 2 and not head.estimated
    assert head.duration_s is not None and 0.95 < head.duration_s < 1.1
    ends: list[audio.Decoded] = []
    y = samples(audio.convert(data, format=ext, target_rate=24000, on_end=ends.append, **LIMITS))
    assert len(ends) == 1 and ends[0].duration_s == pytest.approx(head.duration_s, abs=0.05) and ends[0].note is None
    assert 0.95 * 24000 < len(y) < 1.1 * 24000  # lossy codecs add a little padding
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert abs(np.argmax(spectrum) * 24000 / len(y) - 440) < 5
    assert 0.3 < np.max(np.abs(y[2400:-2400])) < 0.5


def test_a_path_works_like_bytes(stereo_440: Path) -> None:
    from_path = audio.convert(stereo_440, target_rate=16000, **LIMITS)
    from_str = audio.convert(str(stereo_440), target_rate=16000, **LIMITS)
    assert from_path == from_str == audio.convert(stereo_440.read_bytes(), target_rate=16000, **LIMITS)


def test_stereo_is_the_mean_of_its_channels(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    left, right = rng.integers(-32768, 32768, size=(2, 24000), dtype=np.int16)
    src = write_wav(tmp_path / "st.wav", np.column_stack([left, right]), 24000)
    out = np.frombuffer(audio.convert(src, target_rate=24000, **LIMITS), "<i2")
    expected = np.rint((left.astype(np.int64) + right) / 2).astype(np.int16)
    assert np.array_equal(out, expected)
    opposite = write_wav(tmp_path / "op.wav", np.column_stack([left, -left.astype(np.int32)]), 24000)
    assert not np.any(np.frombuffer(audio.convert(opposite, target_rate=24000, **LIMITS), "<i2") > 1)


def test_raw_pcm_with_stated_rate(tmp_path: Path) -> None:
    x = tone(300, 16000, 0.5)
    raw = x.astype("<i2").tobytes()
    wav = write_wav(tmp_path / "m.wav", x, 16000)
    for fmt in ("raw", "pcm", "s16le"):
        out = audio.convert(raw, format=fmt, source_rate=16000, target_rate=24000, **LIMITS)
        assert out == audio.convert(wav, target_rate=24000, **LIMITS)  # same samples, same result
    stereo = np.column_stack([x, x]).astype("<i2").tobytes()
    (tmp_path / "s.raw").write_bytes(stereo)
    out = audio.convert(
        tmp_path / "s.raw", format="raw", source_rate=16000, channels=2, target_rate=16000, **LIMITS
    )
    assert out == raw
    head = audio.sniff(stereo, format="raw", source_rate=16000, channels=2, **LIMITS)
    assert head == Header("s16le", 16000, 2, 0.5)


def test_raw_pcm_needs_a_rate_and_whole_frames() -> None:
    with pytest.raises(AudioError, match="source_rate"):
        audio.pcm_stream(b"\0\0", format="raw", target_rate=24000, **LIMITS)
    with pytest.raises(AudioError, match="whole s16le frames"):
        audio.convert(b"\0\0\0", format="raw", source_rate=24000, target_rate=24000, **LIMITS)


def test_only_16k_and_24k_out() -> None:
    for rate in (8000, 22050, 44100, 48000):
        with pytest.raises(ValueError, match="16000 or 24000"):
            audio.pcm_stream(b"x", target_rate=rate, **LIMITS)


# Bad input -------------------------------------------------------------------------------------


@pytest.fixture
def empty_wav(tmp_path: Path) -> Path:
    return write_wav(tmp_path / "empty.wav", np.zeros(0, np.int16), 24000)


@pytest.fixture
def one_second(tmp_path: Path) -> Path:
    return write_wav(tmp_path / "one.wav", tone(440, 24000, 1.0), 24000)


def rejected(source: object, match: str, decoded: str | None = None, **kw: object) -> None:
    """Refused by the header check before enqueueing, and by the conversion (with ``decoded``,
    the conversion's own words, when they differ)."""
    args = {**LIMITS, **kw}
    with pytest.raises(AudioError, match=match):
        audio.sniff(source, **args)  # type: ignore[arg-type]
    with pytest.raises(AudioError, match=decoded or match):
        audio.convert(source, target_rate=24000, **args)  # type: ignore[arg-type]


def test_unreadable_input_is_refused(tmp_path: Path) -> None:
    rejected(b"this is not audio at all" * 40, "not audio: the file is text", decoded="unreadable")
    rejected(tmp_path / "missing.mp3", "unreadable")
    rejected(b"", "empty")


def test_a_picture_is_not_audio(tmp_path: Path) -> None:
    png = tmp_path / "p.png"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "color=c=red:s=16x16", "-frames:v", "1", str(png)],
        check=True,
    )
    rejected(png, "not audio")


def test_zero_samples_is_empty(empty_wav: Path) -> None:
    rejected(empty_wav, "empty")
    rejected(empty_wav.read_bytes(), "empty")
    rejected(b"", "empty", format="raw", source_rate=24000)
    (empty_wav.parent / "zero.mp3").write_bytes(b"")
    rejected(empty_wav.parent / "zero.mp3", "empty")


def test_over_max_bytes(one_second: Path) -> None:
    rejected(one_second, "too large", max_bytes=1000)
    rejected(one_second.read_bytes(), "too large", max_bytes=1000)
    rejected(b"\0" * 2000, "too large", max_bytes=1000, format="raw", source_rate=24000)


def test_over_max_seconds(one_second: Path) -> None:
    rejected(one_second, "longer than", max_seconds=0.5)
    rejected(b"\0" * 48002, "longer than", max_seconds=1.0, format="raw", source_rate=24000)


def test_duration_is_enforced_on_decoded_samples(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    """A container that does not say its duration passes the header check; the conversion counts
    decoded samples and stops at the limit."""
    from tests.badinput import encode as encode_tone

    webm = encode_tone(tmp_path, "webm", 1.0)
    at = webm.find(b"\x44\x89\x88")  # the Duration element (11 bytes) becomes a Void element
    unsaid = webm[:at] + b"\xec\x89" + bytes(9) + webm[at + 11:]
    head = audio.sniff(unsaid, format="webm", max_bytes=LIMITS["max_bytes"], max_seconds=0.5)
    assert head.format == "webm" and head.duration_s is None
    with pytest.raises(AudioError, match="longer than the limit"):
        audio.convert(unsaid, format="webm", target_rate=24000, max_bytes=LIMITS["max_bytes"], max_seconds=0.5)
    ends: list[audio.Decoded] = []
    audio.convert(unsaid, format="webm", target_rate=24000, on_end=ends.append, **LIMITS)
    assert ends[0].duration_s == pytest.approx(1.0, abs=0.03)
    assert spawned and all(p.returncode is not None for p in spawned)
    for proc in spawned:
        assert_reaped(proc)


# Streaming and cleanup -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def five_minutes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("long") / "long.flac"
    src = "sine=frequency=440:sample_rate=44100:duration=300"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", src, "-c:a", "flac", str(path)], check=True)
    return path


def test_first_block_comes_before_ffmpeg_finishes(
    five_minutes: Path, spawned: list[subprocess.Popen[bytes]], tmpdir_for_audio: Path
) -> None:
    stream = audio.pcm_stream(five_minutes.read_bytes(), format="flac", target_rate=24000, **LIMITS)
    first = next(stream)
    assert len(spawned) == 1
    proc = spawned[0]
    # Five minutes decode to ~53 MB; the pipe holds 64 KB, so ffmpeg cannot have finished.
    assert proc.poll() is None
    assert 0 < len(first) < 300 * 24000 * 2 // 100
    assert list(tmpdir_for_audio.iterdir()) == []  # FLAC bytes reach ffmpeg through its stdin
    stream.close()
    assert_reaped(proc)
    assert list(tmpdir_for_audio.iterdir()) == []


def test_errors_clean_up_too(
    one_second: Path, spawned: list[subprocess.Popen[bytes]], tmpdir_for_audio: Path
) -> None:
    with pytest.raises(AudioError):
        audio.convert(b"not audio" * 100, target_rate=24000, **LIMITS)
    with pytest.raises(AudioError):
        audio.convert(one_second.read_bytes(), target_rate=24000, max_bytes=10**6, max_seconds=0.5)
    gen = audio.pcm_stream(one_second.read_bytes(), target_rate=16000, block_bytes=64, **LIMITS)
    next(gen)
    del gen  # dropped without close: garbage collection closes it
    for proc in spawned:
        assert_reaped(proc)
    assert list(tmpdir_for_audio.iterdir()) == []


# Determinism and passthrough -------------------------------------------------------------------


def test_same_input_same_bytes(tmp_path: Path, stereo_440: Path) -> None:
    mp3 = encode(stereo_440, tmp_path / "d.mp3", "libmp3lame")
    runs = [
        audio.convert(mp3, target_rate=24000, block_bytes=b, **LIMITS)
        for b in (64 * 1024, 64 * 1024, 1000, 333)
    ]
    assert all(r == runs[0] for r in runs)


def test_mono_at_target_rate_passes_through(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    for rate in (16000, 24000):
        x = rng.integers(-32768, 32768, size=rate, dtype=np.int16)
        x[:2] = (-32768, 32767)
        src = write_wav(tmp_path / f"p{rate}.wav", x, rate)
        assert audio.convert(src, target_rate=rate, **LIMITS) == x.astype("<i2").tobytes()
        assert (
            audio.convert(x.tobytes(), format="raw", source_rate=rate, target_rate=rate, **LIMITS)
            == x.tobytes()
        )


def _pieces(stream: Iterator[bytes]) -> list[bytes]:
    return list(stream)


def test_pieces_are_whole_samples_and_never_empty(stereo_440: Path) -> None:
    pieces = _pieces(audio.pcm_stream(stereo_440, target_rate=24000, block_bytes=1000, **LIMITS))
    assert len(pieces) > 10
    assert all(p and len(p) % 2 == 0 for p in pieces)


def test_encoded_audio_of_exactly_the_limit_passes_with_its_padding(tmp_path: Path) -> None:
    from tests.badinput import encode

    exact = encode(tmp_path, "mp3", 1.0, 44100)
    head = audio.sniff(exact, format="mp3", max_bytes=LIMITS["max_bytes"], max_seconds=1.0)
    assert head.duration_s is not None and 1.0 <= head.duration_s <= 1.0 + audio.PADDING_S
    ends: list[audio.Decoded] = []
    assert len(audio.convert(exact, format="mp3", target_rate=24000, max_bytes=LIMITS["max_bytes"], max_seconds=1.0,
                             on_end=ends.append))
    assert 1.0 <= ends[0].duration_s <= 1.0 + audio.PADDING_S  # the encoder's padding decodes too
    over = encode(tmp_path, "mp3", 1.3, 44100)
    with pytest.raises(AudioError, match="longer than the limit"):  # its header says so
        audio.sniff(over, format="mp3", max_bytes=LIMITS["max_bytes"], max_seconds=1.0)
    with pytest.raises(AudioError, match="longer than the limit"):
        audio.convert(over, format="mp3", target_rate=24000, max_bytes=LIMITS["max_bytes"], max_seconds=1.0)


def test_a_header_that_understates_the_length_passes_the_check_and_is_refused_on_what_decodes(tmp_path: Path) -> None:
    from tests.badinput import lying_webm

    data = lying_webm(tmp_path, holds_s=3.0, claims_s=0.5)
    head = audio.sniff(data, format="webm", max_bytes=LIMITS["max_bytes"], max_seconds=1.0)
    assert head.duration_s == pytest.approx(0.5)  # the lie is read, and believed: nothing is decoded
    with pytest.raises(AudioError, match="longer than the limit"):
        audio.convert(data, format="webm", target_rate=24000, max_bytes=LIMITS["max_bytes"], max_seconds=1.0)


def test_a_truncated_file_is_noted_and_converts_as_far_as_it_decodes(tmp_path: Path) -> None:
    from tests.badinput import encode

    whole = encode(tmp_path, "mp3", 1.0, 24000)
    cut = whole[: len(whole) // 2]
    head = audio.sniff(cut, format="mp3", **LIMITS)
    assert head.duration_s == pytest.approx(1.0, abs=0.05)  # the header does not know it was cut
    ends: list[audio.Decoded] = []
    pcm = audio.convert(cut, format="mp3", target_rate=24000, expected_s=head.duration_s, on_end=ends.append, **LIMITS)
    (decoded,) = ends
    assert decoded.note is not None
    assert decoded.note.startswith(f"decoder stopped early: {decoded.duration_s:.2f} s decoded of the")
    assert len(pcm) // 2 == pytest.approx(decoded.duration_s * 24000, abs=2)
    ends.clear()
    audio.convert(whole, format="mp3", target_rate=24000, expected_s=head.duration_s, on_end=ends.append, **LIMITS)
    assert ends[0].note is None


# 16-bit PCM WAV: read as it is, no decoder ------------------------------------------------------


@pytest.mark.parametrize(("rate", "channels"), [(24000, 1), (16000, 1), (44100, 2), (22050, 2), (48000, 1)])
@pytest.mark.parametrize("target", [16000, 24000])
def test_a_16_bit_wav_converts_without_a_decoder_to_the_bytes_the_decoder_gives(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]], rate: int, channels: int, target: int
) -> None:
    noise = np.random.default_rng(rate + channels).uniform(-0.5, 0.5, (rate, channels)) * 32767
    data = write_wav(tmp_path / "n.wav", noise.astype(np.int16), rate).read_bytes()
    ends: list[audio.Decoded] = []
    fast = audio.convert(data, target_rate=target, on_end=ends.append, **LIMITS)
    assert spawned == []  # no process for it
    assert ends == [audio.Decoded(1.0, None)]
    decoded = b"".join(audio._file_stream(data, None, target, LIMITS["max_bytes"], LIMITS["max_seconds"], 64 * 1024,
                                          None, None))
    assert len(spawned) == 1  # the decoder's way, for comparison
    assert fast == decoded


def test_other_wavs_go_to_the_decoder_and_a_plain_wavs_limits_and_cut_frames_hold(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    pcm16 = write_wav(tmp_path / "a.wav", tone(440, 24000, 1.0), 24000)
    f32 = tmp_path / "f.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(pcm16), "-c:a", "pcm_f32le", str(f32)], check=True)
    assert len(audio.convert(f32, target_rate=24000, **LIMITS)) == 48000
    assert len(spawned) == 1  # a float WAV is decoded by ffmpeg
    data = pcm16.read_bytes()
    with pytest.raises(AudioError, match="longer than the limit"):
        audio.convert(data, target_rate=24000, max_bytes=LIMITS["max_bytes"], max_seconds=0.5)
    cut = data[:-1]  # the last sample frame cut in half: it is dropped, the rest plays, and the note says so
    ends: list[audio.Decoded] = []
    assert audio.convert(cut, target_rate=24000, on_end=ends.append, **LIMITS) == \
        audio.convert(data, target_rate=24000, **LIMITS)[:-2]
    assert ends[0].note is not None and "ends 1 bytes before its data chunk does" in ends[0].note
    empty = data[:44]  # a header and no samples
    with pytest.raises(AudioError, match="empty"):
        audio.convert(empty, target_rate=24000, **LIMITS)
    assert len(spawned) == 1


# Fed through a pipe, and the warm spare ---------------------------------------------------------


@pytest.fixture
def warm() -> Iterator[None]:
    """The spare kept for this test; off again after it, with no spare left and no thread
    still starting one (it would start it under the next test's eyes)."""
    audio.keep_warm(True)
    yield
    audio.keep_warm(False)
    for thread in threading.enumerate():
        if thread.name == "echoq-ffmpeg-spare":
            thread.join(30)
    assert audio._spare is None


def spare_ready() -> audio._Piped:
    """The spare, once the thread starting it is done (a guard against a hang, not a timing)."""
    deadline = time.monotonic() + 30
    while (spare := audio._spare) is None or audio._starting:
        assert time.monotonic() < deadline, "no spare ffmpeg was started"
        time.sleep(0.01)
    return spare


def piped(proc: subprocess.Popen[bytes]) -> bool:
    return "pipe:0" in list(proc.args)  # type: ignore[arg-type]


@pytest.fixture
def temp_files(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the named temp files made (audio bytes written for ffmpeg to read)."""
    names: list[str] = []
    real = tempfile.NamedTemporaryFile

    def spy(*args: Any, **kw: Any) -> Any:
        f = real(*args, **kw)
        names.append(f.name)
        return f

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", spy)
    return names


def test_the_second_mp3_is_decoded_by_the_spare_the_first_left_and_gives_the_same_bytes(
    tmp_path: Path, stereo_440: Path, spawned: list[subprocess.Popen[bytes]], temp_files: list[str], warm: None
) -> None:
    data = encode(stereo_440, tmp_path / "a.mp3", "libmp3lame").read_bytes()
    first = audio.convert(data, target_rate=24000, **LIMITS)
    spare = spare_ready()
    assert len(spawned) == 2 and spawned[1] is spare.proc  # the first decode's own, then the spare
    assert spare.proc.poll() is None and all(piped(p) for p in spawned)
    before = list(spawned)
    second = audio.convert(data, target_rate=24000, **LIMITS)
    assert spare.proc.returncode == 0  # it decoded the second file, started before that began
    assert audio._spare is not spare
    assert spare_ready().proc not in before and len(spawned) == 3  # only the next spare was started
    assert temp_files == []  # the bytes went through ffmpeg's stdin
    audio.keep_warm(False)
    cold = audio.convert(data, target_rate=24000, **LIMITS)
    assert first == second == cold
    for proc in spawned:
        assert_reaped(proc)


def test_an_mp3_through_the_pipe_gives_exactly_the_files_samples(tmp_path: Path, stereo_440: Path) -> None:
    """ffmpeg trims an MP3's end padding (its LAME header says how much) when it reads a file, not
    from a pipe; the pipe's output is cut to the header's count, so the same bytes decode to the
    same samples either way (a resumed utterance relies on it) and the decoded length is exact."""
    mp3 = encode(stereo_440, tmp_path / "a.mp3", "libmp3lame")
    from_file = audio.convert(mp3, target_rate=24000, **LIMITS)
    ends: list[audio.Decoded] = []
    from_pipe = audio.convert(mp3.read_bytes(), target_rate=24000, on_end=ends.append, **LIMITS)
    assert from_pipe == from_file
    assert ends[0].duration_s == audio.sniff(mp3.read_bytes(), **LIMITS).duration_s


def test_an_m4a_still_goes_through_a_temp_file_with_the_spare_on(
    tmp_path: Path, stereo_440: Path, spawned: list[subprocess.Popen[bytes]], tmpdir_for_audio: Path, warm: None
) -> None:
    data = encode(stereo_440, tmp_path / "a.m4a", "aac").read_bytes()
    stream = audio.pcm_stream(data, format="m4a", target_rate=24000, **LIMITS)
    first = next(stream)
    assert [p.name for p in tmpdir_for_audio.iterdir()][0].startswith("echoq-")
    assert len(spawned) == 1 and not piped(spawned[0])
    pcm = first + b"".join(stream)
    assert 0.95 * 24000 < len(pcm) // 2 < 1.1 * 24000
    assert list(tmpdir_for_audio.iterdir()) == []
    assert_reaped(spawned[0])
    assert audio._spare is None and not audio._starting  # nothing fed through a pipe, no spare wanted


def test_closing_a_piped_stream_early_kills_ffmpeg_and_ends_the_thread_feeding_it(
    five_minutes: Path, spawned: list[subprocess.Popen[bytes]], tmpdir_for_audio: Path, warm: None
) -> None:
    stream = audio.pcm_stream(five_minutes.read_bytes(), format="flac", target_rate=24000, **LIMITS)
    next(stream)
    proc = spawned[0]
    feeders = [t for t in threading.enumerate() if t.name == "echoq-ffmpeg-feed"]
    # ffmpeg reads as it decodes: megabytes of FLAC cannot all be in by the first piece
    assert len(feeders) == 1 and feeders[0].is_alive()
    assert piped(proc) and proc.poll() is None
    stream.close()
    assert_reaped(proc)
    assert not feeders[0].is_alive()
    assert list(tmpdir_for_audio.iterdir()) == []
    assert not audio._feeds - {spare_ready().stdin}  # only the spare's stdin is still open


def test_a_spare_killed_from_outside_is_reaped_and_replaced(
    tmp_path: Path, stereo_440: Path, spawned: list[subprocess.Popen[bytes]], warm: None
) -> None:
    data = encode(stereo_440, tmp_path / "a.mp3", "libmp3lame").read_bytes()
    expected = audio.convert(data, target_rate=24000, **LIMITS)
    spare = spare_ready()
    os.kill(spare.proc.pid, signal.SIGKILL)
    while not _dead(spare.proc.pid):  # dead, not yet reaped
        time.sleep(0.01)
    assert audio.convert(data, target_rate=24000, **LIMITS) == expected
    assert spare.proc.returncode == -signal.SIGKILL
    assert_reaped(spare.proc)
    assert len(spawned) == 4  # the first decode's, the killed spare, the one started instead, the next spare
    assert spawned[2].returncode == 0 and spare_ready().proc is spawned[3]


def _dead(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] in "ZX"


@pytest.mark.parametrize("case", ["mp3 cut in its first frame", "flac header then noise"])
def test_unreadable_bytes_through_the_pipe_fail_as_from_a_file(
    tmp_path: Path, stereo_440: Path, spawned: list[subprocess.Popen[bytes]], case: str, warm: None
) -> None:
    if case.startswith("mp3"):
        data = encode(stereo_440, tmp_path / "a.mp3", "libmp3lame").read_bytes()[:300]
    else:
        flac = encode(stereo_440, tmp_path / "a.flac", "flac").read_bytes()
        data = flac[:flac.index(b"\xff\xf8", 42) + 20]  # the metadata, then the start of one frame
    assert audio._pipeable(data)
    (tmp_path / "bad").write_bytes(data)
    with pytest.raises(AudioError) as from_file:  # a path: read by name, as bytes were before
        audio.convert(tmp_path / "bad", target_rate=24000, **LIMITS)
    with pytest.raises(AudioError) as from_pipe:
        audio.convert(data, target_rate=24000, **LIMITS)
    assert piped(spawned[-1]) or piped(spawned[-2])
    kind = str(from_file.value).partition("(")[0]
    assert kind.startswith("audio is ") and str(from_pipe.value).partition("(")[0] == kind
    assert "pipe:0" not in str(from_pipe.value)
    spare = spare_ready().proc
    for proc in spawned:
        if proc is not spare:
            assert_reaped(proc)


def test_turning_the_spare_off_kills_and_reaps_it(
    tmp_path: Path, stereo_440: Path, spawned: list[subprocess.Popen[bytes]], warm: None
) -> None:
    data = encode(stereo_440, tmp_path / "a.mp3", "libmp3lame").read_bytes()
    audio.convert(data, target_rate=24000, **LIMITS)
    spare = spare_ready()
    audio.keep_warm(False)
    assert_reaped(spare.proc)
    assert spare.stdin.closed and audio._spare is None and spare.stdin not in audio._feeds
    audio.convert(data, target_rate=24000, **LIMITS)
    assert len(spawned) == 3 and audio._spare is None and not audio._starting  # off: no spare left behind


# Bytes that arrive in parts ----------------------------------------------------------------------


class Parts:
    """The parts after ``head`` in sizes that cycle through ``sizes``; counts the parts taken, and
    stops early after ``stop_after`` parts (the blob went away) or raises ``fail`` there."""

    def __init__(self, data: bytes, sizes: tuple[int, ...], stop_after: int | None = None,
                 fail: BaseException | None = None) -> None:
        self.data, self.sizes, self.stop_after, self.fail = data, sizes, stop_after, fail
        self.taken = 0

    def __iter__(self) -> Iterator[bytes]:
        at = 0
        while at < len(self.data):
            if self.stop_after is not None and self.taken == self.stop_after:
                if self.fail is not None:
                    raise self.fail
                return
            size = self.sizes[self.taken % len(self.sizes)]
            self.taken += 1
            yield self.data[at:at + size]
            at += size

    def count(self, sizes: tuple[int, ...]) -> int:
        at, n = 0, 0
        while at < len(self.data):
            at += self.sizes[n % len(self.sizes)]
            n += 1
        return n


ODD_SIZES = (777, 4099, 1, 65537, 12345)


def arriving(data: bytes, head: int = 9001, **kw: Any) -> tuple[audio.Arriving, Parts]:
    rest = Parts(data[head:], ODD_SIZES, **kw)
    return audio.Arriving(data[:head], len(data), rest), rest


def feeders_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "echoq-ffmpeg-feed" and t.is_alive()]


@pytest.mark.parametrize("head", [1001, 9001])
@pytest.mark.parametrize(("ext", "codec"), [("mp3", "libmp3lame"), ("flac", "flac")])
def test_bytes_arriving_in_parts_decode_to_the_same_pcm_as_the_whole_bytes(
    tmp_path: Path, ext: str, codec: str, head: int, spawned: list[subprocess.Popen[bytes]], temp_files: list[str]
) -> None:
    src = write_wav(tmp_path / "s.wav", np.column_stack([tone(440, 44100, 3.0, 0.4), tone(660, 44100, 3.0, 0.3)]),
                    44100)
    data = encode(src, tmp_path / f"a.{ext}", codec).read_bytes()
    whole = audio.convert(data, target_rate=24000, **LIMITS)
    source, rest = arriving(data, head)
    # 1001 bytes hold too little of the FLAC metadata to tell its format: joined, then piped as bytes
    assert audio._streamable(source.head) == (ext == "mp3" or head > 8192)
    assert audio.convert(source, target_rate=24000, **LIMITS) == whole
    assert rest.taken == rest.count(ODD_SIZES)
    assert len(spawned) == 2 and all(piped(p) for p in spawned)
    assert temp_files == []  # the parts went through ffmpeg's stdin, never joined into a file
    for proc in spawned:
        assert_reaped(proc)


def test_the_first_piece_of_arriving_bytes_comes_before_the_rest_has_arrived(
    five_minutes: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    data = five_minutes.read_bytes()
    rest = Parts(data[256 * 1024:], (64 * 1024,))
    stream = audio.pcm_stream(audio.Arriving(data[:256 * 1024], len(data), rest), target_rate=24000, **LIMITS)
    next(stream)
    # ffmpeg takes its input as it decodes (the pipes hold 64 KB each): megabytes are still to come
    assert rest.taken < rest.count((64 * 1024,))
    stream.close()
    assert_reaped(spawned[0])
    assert feeders_alive() == []


@pytest.mark.parametrize("kind", ["wav", "raw"])
def test_arriving_bytes_that_do_not_go_through_a_pipe_are_joined_and_decode_the_same(
    tmp_path: Path, stereo_440: Path, kind: str
) -> None:
    data = stereo_440.read_bytes() if kind == "wav" else tone(440, 16000, 1.0).astype("<i2").tobytes()
    opts: dict[str, Any] = {"format": "raw", "source_rate": 16000} if kind == "raw" else {}
    source, rest = arriving(data)
    assert audio.convert(source, target_rate=24000, **opts, **LIMITS) == \
        audio.convert(data, target_rate=24000, **opts, **LIMITS)
    assert rest.taken == rest.count(ODD_SIZES)


@pytest.mark.parametrize("ext", ["mp3", "flac", "wav"])
def test_arriving_bytes_that_end_short_fail_the_decode_and_leave_nothing_running(
    tmp_path: Path, stereo_440: Path, ext: str, spawned: list[subprocess.Popen[bytes]]
) -> None:
    data = stereo_440.read_bytes() if ext == "wav" else \
        encode(stereo_440, tmp_path / f"a.{ext}", "libmp3lame" if ext == "mp3" else "flac").read_bytes()
    source, _rest = arriving(data, stop_after=3)
    got = 9001 + sum(ODD_SIZES[:3])
    with pytest.raises(AudioError, match=f"^the audio blob went away while it was read: {got} of {len(data)} bytes$"):
        audio.convert(source, target_rate=24000, **LIMITS)
    for proc in spawned:
        assert_reaped(proc)
    assert feeders_alive() == []


class Gone(Exception):
    """What reading the next part raised (a connection lost, say)."""


def test_an_error_reading_a_part_comes_out_of_the_decode_as_it_is(
    tmp_path: Path, stereo_440: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    data = encode(stereo_440, tmp_path / "a.flac", "flac").read_bytes()
    source, _rest = arriving(data, stop_after=2, fail=Gone("connection lost"))
    ends: list[audio.Decoded] = []
    with pytest.raises(Gone, match="connection lost"):
        audio.convert(source, target_rate=24000, on_end=ends.append, **LIMITS)
    assert ends == []  # never reported as a decode that merely stopped early
    assert len(spawned) == 1 and piped(spawned[0])
    assert_reaped(spawned[0])
    assert feeders_alive() == []


def test_arriving_bytes_over_the_size_limit_are_refused_without_reading_the_rest(
    spawned: list[subprocess.Popen[bytes]]
) -> None:
    class Untouchable:
        def __iter__(self) -> Iterator[bytes]:
            pytest.fail("the rest of an oversized file was read")

    source = audio.Arriving(b"\xff\xfb\x90\x00" * 256, LIMITS["max_bytes"] + 1, Untouchable())
    with pytest.raises(AudioError, match="too large"):
        audio.convert(source, target_rate=24000, **LIMITS)
    assert spawned == []
