"""Audio conversion: anything ffmpeg reads, or raw PCM, to s16le mono PCM at 16 or 24 kHz.

Pure conversion: no Redis, no network. ffmpeg decodes at the file's own rate to float samples
on a pipe, numpy downmixes (mean of the channels), soxr resamples. pydub's ``set_frame_rate``
is never used: it has no anti-alias filter (PROTOCOL.md, "Audio conversion quality").

Output is deterministic: the same input converted twice gives the same bytes, which the sender
relies on to resume an utterance mid-way by converting again and skipping sent chunks.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import tempfile
from collections.abc import Generator, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import soxr
from pydub import AudioSegment
from pydub.utils import get_prober_name, mediainfo_json, which

from .errors import AudioError, ConfigError
from .settings import SAMPLE_RATES

Source = bytes | str | os.PathLike[str]

RAW_FORMATS = ("raw", "pcm", "s16le")
QUALITY = "VHQ"
_F32 = 4  # bytes per sample on the ffmpeg pipe
_S16 = 2  # bytes per sample of raw input and of the output
#: encoded audio this much over ``max_seconds`` is still accepted: encoders pad (an MP3 of
#: exactly the limit decodes a few tens of milliseconds longer); raw PCM has no padding
PADDING_S = 0.1
#: a decode this much shorter than the container's duration counts as stopping early
_SHORT_S = 0.25


@dataclass(frozen=True)
class AudioInfo:
    """What :func:`probe` found. ``format`` is ffprobe's container name, or ``s16le`` for raw.

    ``duration_s`` is what decodes, never only what a header claims. ``note`` says why, when the
    decoder stopped before the end the container announced (a truncated file), else it is None.
    """

    duration_s: float
    sample_rate: int
    channels: int
    format: str
    note: str | None = None


def probe(
    source: Source,
    *,
    format: str | None = None,
    source_rate: int | None = None,
    channels: int = 1,
    max_bytes: int,
    max_seconds: float,
) -> AudioInfo:
    """Check audio before it is enqueued; :class:`AudioError` names what is wrong.

    Refuses input that is unreadable or not audio, over ``max_bytes``, longer than
    ``max_seconds`` (plus :data:`PADDING_S` unless raw) or empty. The audio is decoded to count its samples
    (stopping once it is over the limit): a container's duration can lie either way.
    """
    if _is_raw(format):
        rate, ch = _raw_params(source_rate, channels)
        frames = _raw_frame_count(_checked_size(source, max_bytes), ch)
        info = AudioInfo(frames / rate, rate, ch, "s16le")
    else:
        with _as_path(source, format, max_bytes) as path:
            rate, ch, name, claimed = _probe_file(path)
            frames, reason = _count_frames(path, rate, ch, _max_frames(max_seconds, rate) + 1)
            info = AudioInfo(frames / rate, rate, ch, name, _early_stop(frames / rate, claimed, reason))
    _check_seconds(info.duration_s, max_seconds, 0.0 if info.format == "s16le" else PADDING_S)
    if info.duration_s <= 0:
        raise AudioError("audio is empty: no samples")
    return info


def pcm_stream(
    source: Source,
    *,
    target_rate: int,
    format: str | None = None,
    source_rate: int | None = None,
    channels: int = 1,
    max_bytes: int,
    max_seconds: float,
    block_bytes: int = 64 * 1024,
) -> Generator[bytes, None, None]:
    """Yield s16le mono PCM at ``target_rate`` (16000 or 24000) as the input is decoded.

    ``source`` is a path or the file's bytes. ``format`` is a hint (the temp file's suffix),
    except that ``raw``/``pcm``/``s16le`` means headerless s16le PCM, which needs
    ``source_rate`` and ``channels``; for everything else the container says rate and channels.
    ``block_bytes`` is how much decoded audio is read per step; yielded pieces vary in length
    but are never empty and always hold whole samples. Mono input at ``target_rate`` passes
    through unchanged.

    Mistakes in the arguments (``target_rate``, raw PCM without ``source_rate``) raise at the
    call. :class:`AudioError` for unreadable, oversized, too long or empty audio comes out of
    iteration, before any output unless only decoding shows it (a container whose duration is
    wrong is stopped at ``max_seconds`` of decoded samples). Closing the generator early
    (``close()``, or dropping it) stops ffmpeg and removes the temp file.
    """
    if target_rate not in SAMPLE_RATES:
        raise ValueError(f"target_rate must be 16000 or 24000, not {target_rate}")
    if block_bytes < 64:
        raise ValueError(f"block_bytes must be at least 64, not {block_bytes}")
    if _is_raw(format):
        rate, ch = _raw_params(source_rate, channels)
        return _raw_stream(source, rate, ch, target_rate, max_bytes, max_seconds, block_bytes)
    return _file_stream(source, format, target_rate, max_bytes, max_seconds, block_bytes)


def convert(source: Source, **options: Any) -> bytes:
    """The whole of :func:`pcm_stream` as one bytes object; takes the same arguments."""
    return b"".join(pcm_stream(source, **options))


def _raw_stream(
    source: Source, rate: int, ch: int, target_rate: int, max_bytes: int, max_seconds: float, block_bytes: int
) -> Generator[bytes, None, None]:
    _check_seconds(_raw_frame_count(_checked_size(source, max_bytes), ch) / rate, max_seconds)
    with _open_raw(source) as stream:
        frames = yield from _resample(
            _read_frames(stream, ch, _S16, block_bytes), rate, target_rate, int(max_seconds * rate)
        )
    if frames == 0:
        raise AudioError("audio is empty: no samples")


def _file_stream(
    source: Source, format: str | None, target_rate: int, max_bytes: int, max_seconds: float, block_bytes: int
) -> Generator[bytes, None, None]:
    with _as_path(source, format, max_bytes) as path:
        rate, ch, _, _claimed = _probe_file(path)
        with _ffmpeg(path, rate, ch) as (proc, stderr):
            # The limit is checked on decoded samples, never on the container's duration, which can lie.
            frames = yield from _resample(
                _read_frames(proc.stdout, ch, _F32, block_bytes), rate, target_rate, _max_frames(max_seconds, rate)
            )
            # A decoder that fails after giving samples stopped early: what it gave is the audio
            # (probe saw the same and noted it on the record), so only a decode of nothing fails.
            if proc.wait() != 0 and frames == 0:
                raise AudioError(f"audio is unreadable: ffmpeg could not decode it ({_tail(stderr)})")
    if frames == 0:
        raise AudioError("audio is empty: no samples after decoding")


def _resample(
    blocks: Iterator[np.ndarray], rate: int, target_rate: int, max_frames: int
) -> Generator[bytes, None, int]:
    """Downmix and resample float frames; returns how many input frames there were."""
    # soxr's output does not depend on how its input is split, so conversion is deterministic.
    resampler = None if rate == target_rate else soxr.ResampleStream(rate, target_rate, 1, "float32", QUALITY)
    frames = 0
    for block in blocks:
        frames += len(block)
        if frames > max_frames:
            raise AudioError(f"audio is longer than the limit of {max_frames / rate:g} s")
        mono = block[:, 0] if block.shape[1] == 1 else block.mean(axis=1, dtype=np.float32)
        out = mono if resampler is None else resampler.resample_chunk(mono)
        if out.size:
            yield _to_s16le(out)
    if resampler is not None and frames:
        tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        if tail.size:
            yield _to_s16le(tail)
    return frames


def _to_s16le(samples: np.ndarray) -> bytes:
    # Scaling by 2**15 is exact, so samples that came in as s16 go out bit for bit.
    scaled = np.rint(samples * np.float32(32768.0))
    return np.clip(scaled, -32768, 32767).astype("<i2").tobytes()


def _read_frames(stream: IO[bytes] | None, ch: int, width: int, block_bytes: int) -> Iterator[np.ndarray]:
    """Float32 frames of shape (n, ch) from s16le (width 2) or f32le (width 4) bytes."""
    assert stream is not None
    frame = ch * width
    size = max(frame, block_bytes - block_bytes % frame)
    while True:
        # A buffered read returns the full size until EOF: blocks do not depend on pipe timing.
        data = stream.read(size)
        if not data:
            return
        if len(data) % frame:
            raise AudioError("audio is unreadable: it ends inside a sample frame")
        if width == _S16:
            yield (np.frombuffer(data, "<i2").astype(np.float32) / np.float32(32768.0)).reshape(-1, ch)
        else:
            yield np.frombuffer(data, "<f4").reshape(-1, ch)


def _count_frames(path: str, rate: int, ch: int, stop_at: int) -> tuple[int, str | None]:
    """Decode to count frames, stopping once there are ``stop_at`` (enough to refuse); with the
    decoder's complaint, when it had one."""
    frames = 0
    with _ffmpeg(path, rate, ch) as (proc, stderr):
        for block in _read_frames(proc.stdout, ch, _F32, 64 * 1024):
            frames += len(block)
            if frames >= stop_at:
                return frames, None
        code = proc.wait()
        said = _tail(stderr)
    if code != 0 or said:
        return frames, said or f"ffmpeg exited with {code}"
    return frames, None


def _early_stop(decoded_s: float, claimed_s: float | None, reason: str | None) -> str | None:
    """The note for a decode that stopped early: seconds decoded and why, or None."""
    short = claimed_s is not None and decoded_s < claimed_s - _SHORT_S
    if reason is None and not short:
        return None
    of = f" of the {claimed_s:.2f} s the container claims" if short else ""
    return f"decoder stopped early: {decoded_s:.2f} s decoded{of} ({reason or 'the data ends before that'})"


def _tail(stderr: IO[bytes]) -> str:
    """The end of what ffmpeg wrote to ``stderr``, one line."""
    stderr.seek(0)
    said = re.sub(r"\[[^\]]* @ 0x[0-9a-f]+\] ", "", stderr.read().decode("utf-8", "replace"))  # drop pointers
    return " ".join(said.split())[-300:]


def _max_frames(max_seconds: float, rate: int) -> int:
    return int((max_seconds + PADDING_S) * rate)


def _spawn(args: list[str], stderr: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start ffmpeg (tests wrap this to watch the process)."""
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)


@contextmanager
def _ffmpeg(path: str, rate: int, ch: int) -> Iterator[tuple[subprocess.Popen[bytes], IO[bytes]]]:
    """ffmpeg decoding the first audio stream of ``path`` to f32le at its own rate, killed on exit."""
    binary = which(AudioSegment.converter)  # the ffmpeg pydub would use
    if binary is None:
        raise ConfigError(f"{AudioSegment.converter} is not installed; audio cannot be decoded")
    # -ar and -ac pin what the probe saw, so the frame layout cannot drift mid-stream.
    args = [binary, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", path, "-map", "0:a:0",
            "-ac", str(ch), "-ar", str(rate), "-f", "f32le", "-c:a", "pcm_f32le", "pipe:1"]  # fmt: skip
    # stderr goes to an unnamed file: a pipe nobody reads could fill and stall ffmpeg.
    with tempfile.TemporaryFile() as stderr:
        proc = _spawn(args, stderr)
        try:
            yield proc, stderr
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def _probe_file(path: str) -> tuple[int, int, str, float | None]:
    """Rate, channels, container name and duration (None when unknown) of the first audio stream."""
    if which(get_prober_name()) is None:
        raise ConfigError(f"{get_prober_name()} is not installed; audio cannot be probed")
    try:
        info: dict[str, Any] = mediainfo_json(path)
        streams = [s for s in info.get("streams", []) if s.get("codec_type") == "audio"]
        container = info.get("format", {})
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise AudioError(f"audio is unreadable: ffprobe failed ({exc})") from exc
    if not info:
        raise AudioError("audio is unreadable: ffprobe does not recognise it")
    if not streams:
        raise AudioError("not audio: the file has no audio stream")
    stream = streams[0]
    try:
        rate, ch = int(stream["sample_rate"]), int(stream["channels"])
    except (KeyError, ValueError) as exc:
        raise AudioError("audio is unreadable: no sample rate or channel count") from exc
    if rate <= 0 or ch <= 0:
        raise AudioError(f"audio is unreadable: {rate} Hz, {ch} channels")
    duration = _seconds(stream.get("duration")) or _seconds(container.get("duration"))
    return rate, ch, str(container.get("format_name", "unknown")), duration


def _seconds(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "N/A") else None
    except (TypeError, ValueError):
        return None


@contextmanager
def _as_path(source: Source, format: str | None, max_bytes: int) -> Iterator[str]:
    """A path ffmpeg can read; bytes go to a temp file (mp4/m4a need seekable input)."""
    if _checked_size(source, max_bytes) == 0:
        raise AudioError("audio is empty: 0 bytes")
    if not isinstance(source, bytes | bytearray | memoryview):
        # "file:" keeps a name such as "http://..." or "concat:..." from being read as a protocol.
        yield "file:" + os.path.abspath(os.fspath(source))
        return
    suffix = "." + format if format and format.isalnum() else ""
    with tempfile.NamedTemporaryFile(prefix="echoq-", suffix=suffix, delete=False) as tmp:
        tmp.write(source)
    try:
        yield "file:" + tmp.name
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp.name)


@contextmanager
def _open_raw(source: Source) -> Iterator[IO[bytes]]:
    if isinstance(source, bytes | bytearray | memoryview):
        yield io.BytesIO(source)
    else:
        with open(source, "rb") as f:
            yield f


def _checked_size(source: Source, max_bytes: int) -> int:
    if isinstance(source, bytes | bytearray | memoryview):
        size = len(source)
    else:
        try:
            size = os.stat(source).st_size
        except OSError as exc:
            raise AudioError(
                f"audio is unreadable: cannot open {os.fspath(source)!r} ({exc.strerror})"
            ) from exc
    if size > max_bytes:
        raise AudioError(f"audio is too large: {size} bytes, over the limit of {max_bytes} bytes")
    return size


def _check_seconds(duration: float, max_seconds: float, slack: float = 0.0) -> None:
    if duration > max_seconds + slack:
        raise AudioError(f"audio is longer than the limit: {duration:.2f} s, over {max_seconds:g} s")


def _is_raw(format: str | None) -> bool:
    return format is not None and format.lower() in RAW_FORMATS


def _raw_params(source_rate: int | None, channels: int) -> tuple[int, int]:
    if not source_rate or source_rate <= 0:
        raise AudioError("raw PCM needs source_rate: it has no header to say its sample rate")
    if channels < 1:
        raise AudioError(f"raw PCM needs at least one channel, not {channels}")
    return int(source_rate), int(channels)


def _raw_frame_count(size: int, ch: int) -> int:
    if size % (ch * _S16):
        raise AudioError(f"audio is unreadable: {size} bytes is not whole s16le frames of {ch} channel(s)")
    return size // (ch * _S16)
