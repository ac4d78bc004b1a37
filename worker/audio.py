"""Audio conversion: anything ffmpeg reads, or raw PCM, to s16le mono PCM at 16 or 24 kHz.

Pure conversion: no Redis, no network. ffmpeg decodes at the file's own rate to float samples
in a WAV on a pipe (its header says the rate and channels: one process, no ffprobe before it),
numpy downmixes (mean of the channels), soxr resamples. pydub's ``set_frame_rate`` is never
used: it has no anti-alias filter (PROTOCOL.md, "Audio conversion quality").

:func:`sniff` is the producer's check before enqueueing: header bytes only, no decoding, no
subprocess (see :mod:`worker.sniff`). The worker decodes with :func:`pcm_stream`, which enforces
the limit on decoded samples and raises :class:`AudioError` for what does not decode.

Output is deterministic: the same input converted twice gives the same bytes, which the sender
relies on to resume an utterance mid-way by converting again and skipping sent chunks.

Bytes whose content ffmpeg reads without seeking (:data:`PIPE_FORMATS`: MP3, ADTS AAC, Ogg, FLAC,
WAV) reach ffmpeg through its stdin, written by a thread, with no temp file; the rest (MP4/M4A,
whose index may sit at the end, WebM, anything unknown, and every path) is read from a file.
Which way depends on the content only, so the same bytes always decode the same way. An ffmpeg
takes about a tenth of a second to start; :func:`keep_warm` keeps one started ahead of need for
the pipe's way.

Bytes that are still arriving (:class:`Arriving`: a first part, the whole size, the parts after
it as they come) are written to ffmpeg's stdin part by part when their content goes the pipe's
way, so decoding starts before the last part is in; every other way joins the parts first.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import IO, Any, Protocol

import numpy as np
import soxr
from pydub import AudioSegment
from pydub.utils import which

from .errors import AudioError, ConfigError
from .settings import SAMPLE_RATES
from .sniff import Header, look, wav_chunks

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
#: a duration estimated from a constant bitrate and the size is refused only this much over
#: the limit (a tag the estimate counted as audio makes it a little long)
_ESTIMATE_SLACK = 0.02


@dataclass(frozen=True)
class Arriving:
    """The bytes of a file that arrive in parts: ``head``, the first part, is here; ``rest``
    yields the parts after it, in order, each read when it is asked for; ``size`` is the length
    of the whole file.

    :func:`pcm_stream` takes it wherever it takes bytes and gives the same output as for the
    joined bytes. The size limit is checked on ``size`` (nothing of ``rest`` is read for a file
    refused); the content is judged on ``head``. When ``head`` shows a format ffmpeg reads from
    a pipe (:data:`PIPE_FORMATS`, but WAV), the thread feeding ffmpeg writes ``head`` and then
    each part as it comes, so the first samples come before the last part is read. Every other
    way (raw PCM, WAV, a format read from a temp file, a ``head`` too short to tell) joins the
    parts into bytes first and goes on exactly as for bytes: simple, and the same decode.

    Parts that end short of ``size`` (the file went away while it was read) or run past it
    fail the decode with :class:`AudioError`, never a quietly truncated output; an error
    ``rest`` raises comes out of the decode as it is.
    """

    head: bytes
    size: int
    rest: Iterable[bytes]


@dataclass(frozen=True)
class Decoded:
    """What decoding found, handed to ``pcm_stream``'s ``on_end`` once the input is used up:
    seconds of audio decoded, and ``note`` when the decoder stopped before the end the header
    announced (a truncated file) or complained, else None."""

    duration_s: float
    note: str | None = None


def sniff(
    source: Source,
    *,
    format: str | None = None,
    source_rate: int | None = None,
    channels: int = 1,
    max_bytes: int,
    max_seconds: float,
) -> Header:
    """The cheap check before audio is enqueued; :class:`AudioError` names what is wrong.

    Refuses input over ``max_bytes``, empty, clearly not audio (text, an image, an executable,
    zero bytes), a known container whose header is broken, and a header whose duration is over
    ``max_seconds`` (plus :data:`PADDING_S` unless raw; a duration estimated from a variable
    bitrate is never refused on). Reads header bytes only: no decoding, no subprocess. What
    passes can still fail to decode, or decode longer than its header says; :func:`pcm_stream`
    refuses that in the worker. Raw PCM (``format="raw"``) is sized by arithmetic, exactly.
    """
    if _is_raw(format):
        rate, ch = _raw_params(source_rate, channels)
        frames = _raw_frame_count(_checked_size(source, max_bytes), ch)
        head = Header("s16le", rate, ch, frames / rate)
    else:
        if _checked_size(source, max_bytes) == 0:
            raise AudioError("audio is empty: 0 bytes")
        if isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
        else:
            with open(source, "rb") as f:
                data = f.read()
        head = look(data)
    if head.duration_s is not None and (head.trusted or head.duration_s <= 0):
        about = "about " if head.estimated else ""
        if head.duration_s > max_seconds + (0.0 if head.format == "s16le" else PADDING_S) + (
                _ESTIMATE_SLACK * max_seconds if head.estimated else 0.0):
            raise AudioError(f"audio is longer than the limit: {about}{head.duration_s:.2f} s, over {max_seconds:g} s")
        if head.duration_s <= 0 and not head.estimated:
            raise AudioError("audio is empty: no samples")
    return head


def pcm_stream(
    source: Source | Arriving,
    *,
    target_rate: int,
    format: str | None = None,
    source_rate: int | None = None,
    channels: int = 1,
    max_bytes: int,
    max_seconds: float,
    block_bytes: int = 64 * 1024,
    expected_s: float | None = None,
    on_end: Callable[[Decoded], None] | None = None,
) -> Generator[bytes, None, None]:
    """Yield s16le mono PCM at ``target_rate`` (16000 or 24000) as the input is decoded.

    ``source`` is a path, the file's bytes, or its bytes as they arrive (:class:`Arriving`). ``format`` is a hint (the temp file's suffix),
    except that ``raw``/``pcm``/``s16le`` means headerless s16le PCM, which needs
    ``source_rate`` and ``channels``; for everything else the container says rate and channels.
    ``block_bytes`` is how much decoded audio is read per step; yielded pieces vary in length
    but are never empty and always hold whole samples. Mono input at ``target_rate`` passes
    through unchanged.

    Mistakes in the arguments (``target_rate``, raw PCM without ``source_rate``) raise at the
    call. :class:`AudioError` for unreadable, oversized, too long or empty audio comes out of
    iteration, before any output unless only decoding shows it (a container whose duration is
    wrong is stopped at ``max_seconds`` of decoded samples). Closing the generator early
    (``close()``, or dropping it) kills and reaps ffmpeg, waits for the thread feeding its stdin
    and removes the temp file.

    ``on_end`` is called with what was decoded (:class:`Decoded`) once the input is used up,
    before the last piece is yielded; ``expected_s``, the duration the header announced
    (:func:`sniff`), lets it note a decode that stopped well short of that.
    """
    if target_rate not in SAMPLE_RATES:
        raise ValueError(f"target_rate must be 16000 or 24000, not {target_rate}")
    if block_bytes < 64:
        raise ValueError(f"block_bytes must be at least 64, not {block_bytes}")
    if _is_raw(format):
        _raw_params(source_rate, channels)

    def stream(data: Source) -> Generator[bytes, None, None]:
        if _is_raw(format):
            rate, ch = _raw_params(source_rate, channels)
            return _raw_stream(data, rate, ch, target_rate, max_bytes, max_seconds, block_bytes, on_end)
        wav = _plain_wav(data, max_bytes)
        if wav is not None:
            return _wav_stream(data, wav, target_rate, max_seconds, block_bytes, expected_s, on_end)
        return _file_stream(data, format, target_rate, max_bytes, max_seconds, block_bytes, expected_s, on_end)

    if isinstance(source, Arriving):
        return _arriving_stream(source, stream, format, target_rate, max_bytes, max_seconds, block_bytes, expected_s,
                                on_end)
    return stream(source)


def convert(source: Source | Arriving, **options: Any) -> bytes:
    """The whole of :func:`pcm_stream` as one bytes object; takes the same arguments."""
    return b"".join(pcm_stream(source, **options))


def _arriving_stream(
    source: Arriving, stream: Callable[[Source], Generator[bytes, None, None]], format: str | None, target_rate: int,
    max_bytes: int, max_seconds: float, block_bytes: int, expected_s: float | None,
    on_end: Callable[[Decoded], None] | None,
) -> Generator[bytes, None, None]:
    _checked_size(source, max_bytes)  # before a part of the rest is read
    if _is_raw(format) or not _streamable(source.head):
        yield from stream(b"".join(_parts(source)))
        return
    yield from _file_stream(source, format, target_rate, max_bytes, max_seconds, block_bytes, expected_s, on_end)


def _streamable(head: bytes) -> bool:
    """Whether bytes that start with ``head`` go to ffmpeg part by part as they arrive: a format
    it reads from a pipe. WAV is joined first: a 16-bit one is read with no decoder, and which
    way it goes must not depend on how much of it had arrived."""
    try:
        return look(head).format in PIPE_FORMATS - {"wav"}
    except AudioError:  # too little to tell, or not audio: joined, then judged as bytes are
        return False


def _parts(source: Arriving) -> Iterator[bytes]:
    """``head``, then each part of ``rest``; :class:`AudioError` if they end short of ``size``
    or run past it."""
    got = len(source.head)
    if got > source.size:
        raise AudioError(f"the audio blob changed while it was read: more than its {source.size} bytes")
    yield source.head
    for part in source.rest:
        got += len(part)
        if got > source.size:
            raise AudioError(f"the audio blob changed while it was read: more than its {source.size} bytes")
        if part:
            yield part
    if got < source.size:
        raise AudioError(f"the audio blob went away while it was read: {got} of {source.size} bytes")


def _raw_stream(
    source: Source, rate: int, ch: int, target_rate: int, max_bytes: int, max_seconds: float, block_bytes: int,
    on_end: Callable[[Decoded], None] | None,
) -> Generator[bytes, None, None]:
    _check_seconds(_raw_frame_count(_checked_size(source, max_bytes), ch) / rate, max_seconds)
    with _open_raw(source) as stream:
        frames = yield from _resample(
            _read_frames(stream, ch, _S16, block_bytes), rate, target_rate, int(max_seconds * rate),
            None if on_end is None else lambda n: on_end(Decoded(n / rate)),
        )
    if frames == 0:
        raise AudioError("audio is empty: no samples")


@dataclass(frozen=True)
class _PlainWav:
    """Where the samples of a 16-bit PCM WAV file are: read as they are, with no decoder."""

    rate: int
    channels: int
    offset: int
    size: int
    #: the data chunk says it holds more than the file does: a file cut short
    short_by: int = 0


def _plain_wav(source: Source, max_bytes: int) -> _PlainWav | None:
    """The layout of ``source`` if it is a 16-bit integer PCM WAV file (what most speech
    synthesizers write), else None (ffmpeg decodes it). Starting a decoder process costs tens of
    milliseconds of CPU, more than converting a short clip; these samples need no decoding."""
    try:
        size = _checked_size(source, max_bytes)
    except AudioError:
        return None  # the decoder path reports it
    with _open_raw(source) as stream:
        try:
            fmt, _fact, stated = wav_chunks(stream.read)
        except AudioError:
            return None
        offset = stream.tell()
    if fmt.tag != 1 or fmt.bits != 16 or not 1 <= fmt.channels <= 8 or not 1000 <= fmt.rate <= 384000:
        return None
    held = size - offset
    data = held if stated in (0, 0xFFFFFFFF) else min(stated, held)  # 0 / ~0: written as a stream, or RF64
    frame = 2 * fmt.channels
    # a size no file under the limit could have is a placeholder (a WAV written as a stream), not
    # a promise the file broke; a size it could have and does not is a file cut short
    short_by = stated - held if held < stated <= max_bytes else 0
    return _PlainWav(fmt.rate, fmt.channels, offset, data - data % frame, short_by)  # a cut last frame is dropped


def _wav_stream(
    source: Source, wav: _PlainWav, target_rate: int, max_seconds: float, block_bytes: int,
    expected_s: float | None, on_end: Callable[[Decoded], None] | None,
) -> Generator[bytes, None, None]:
    def ended(frames: int) -> None:
        # a file cut short plays what it holds; the note says where it stopped and why
        reason = f"the file ends {wav.short_by} bytes before its data chunk does" if wav.short_by else None
        if on_end is not None and frames:
            on_end(Decoded(frames / wav.rate, _early_stop(frames / wav.rate, expected_s, reason)))

    with _open_raw(source) as stream:
        stream.seek(wav.offset)
        samples = _Bounded(stream, wav.size)  # read as it goes, up to the data chunk's end
        frames = yield from _resample(_read_frames(samples, wav.channels, _S16, block_bytes), wav.rate, target_rate,
                                      _max_frames(max_seconds, wav.rate), ended)
    if frames == 0:
        raise AudioError("audio is empty: no samples")


class _Reads(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Bounded:
    """The first ``size`` bytes of ``stream``, from where it is."""

    def __init__(self, stream: IO[bytes], size: int) -> None:
        self._stream = stream
        self._left = size

    def read(self, n: int = -1) -> bytes:
        want = self._left if n < 0 else min(n, self._left)
        data = self._stream.read(want) if want else b""
        self._left -= len(data)
        return data


def _file_stream(
    source: Source | Arriving, format: str | None, target_rate: int, max_bytes: int, max_seconds: float,
    block_bytes: int, expected_s: float | None, on_end: Callable[[Decoded], None] | None,
) -> Generator[bytes, None, None]:
    header = _header(source)  # once: which way it goes to ffmpeg, and an MP3's exact length
    with _decoder(source, format, max_bytes, header) as (proc, stderr, fed):
        try:
            rate, ch = _pipe_header(proc, stderr)

            def ended(frames: int) -> None:
                fed()  # input that went away mid-way is the error, not the part of it that decoded
                # A decoder that fails after giving samples stopped early: what it gave is the
                # audio, and the note says where and why it stopped; a decode of nothing fails.
                code, said = proc.wait(), _tail(stderr)
                if frames == 0 and (code != 0 or said):
                    raise AudioError(
                        f"audio is unreadable: ffmpeg could not decode it ({said or f'exit status {code}'})")
                if frames == 0 and expected_s:
                    raise AudioError(
                        f"audio is unreadable: its header says {expected_s:.2f} s, and not a sample decodes")
                reason = said or (f"ffmpeg exited with {code}" if code else None)
                if on_end is not None and frames:
                    on_end(Decoded(frames / rate, _early_stop(frames / rate, expected_s, reason)))

            blocks = _read_frames(_Checked(proc.stdout, fed), ch, _F32, block_bytes)
            exact = _mp3_samples(header)
            if exact is not None and rate == exact[1]:
                blocks = _first_frames(blocks, exact[0])
            # The limit is checked on decoded samples, never on the container's duration, which can lie.
            frames = yield from _resample(blocks, rate, target_rate, _max_frames(max_seconds, rate), ended)
        except AudioError:
            fed()  # what ffmpeg made of input cut short says less than that it was cut
            raise
    if frames == 0:
        raise AudioError("audio is empty: no samples after decoding")


def _header(source: Source | bytearray | memoryview | Arriving) -> Header | None:
    """What the header of bytes (of an arriving file: of its first part) says; None for a path
    or what the header check refuses."""
    if isinstance(source, Arriving):
        data = source.head  # an MP3's Xing/LAME header is in its first frame
    elif isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        return None
    try:
        return look(data)
    except AudioError:
        return None


def _mp3_samples(header: Header | None) -> tuple[int, int] | None:
    """``(samples, rate)`` an MP3 holds by its header's count (Xing/LAME: the encoder's delay
    and padding taken off), for bytes that go through ffmpeg's stdin: from a file ffmpeg trims the
    end padding itself, from a pipe it does not, so the pipe's output is cut here to the same
    samples. None for anything else."""
    if header is None or header.format != "mp3" or header.estimated or header.duration_s is None \
            or not header.sample_rate:
        return None
    return round(header.duration_s * header.sample_rate), header.sample_rate


def _first_frames(blocks: Iterator[np.ndarray], count: int) -> Iterator[np.ndarray]:
    """The first ``count`` frames of ``blocks``; the rest is read (so the decoder can finish) and
    dropped."""
    left = count
    for block in blocks:
        if left <= 0:
            continue
        if len(block) > left:
            block = block[:left]
        left -= len(block)
        yield block


class _Checked:
    """Reads of ``stream`` that raise what ``fed`` raises (the input went away) once it does."""

    def __init__(self, stream: IO[bytes] | None, fed: Callable[[], None]) -> None:
        assert stream is not None
        self._stream = stream
        self._fed = fed

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        self._fed()
        return data


def _pipe_header(proc: subprocess.Popen[bytes], stderr: IO[bytes]) -> tuple[int, int]:
    """Rate and channels from the header of the WAV ffmpeg writes on the pipe."""
    assert proc.stdout is not None
    try:
        fmt, _fact, _size = wav_chunks(proc.stdout.read)
    except AudioError:
        proc.wait()
        said = _tail(stderr)
        if "matches no streams" in said:
            raise AudioError("not audio: the file has no audio stream") from None
        if not said and proc.returncode == 0:
            raise AudioError("audio is empty: no samples after decoding") from None
        raise AudioError(f"audio is unreadable: ffmpeg could not decode it ({said})") from None
    if fmt.channels < 1 or fmt.rate < 1 or fmt.bits != 32:
        raise AudioError(f"audio is unreadable: ffmpeg decoded {fmt.rate} Hz, {fmt.channels} channels")
    return fmt.rate, fmt.channels


def _resample(
    blocks: Iterator[np.ndarray], rate: int, target_rate: int, max_frames: int,
    ended: Callable[[int], None] | None = None,
) -> Generator[bytes, None, int]:
    """Downmix and resample float frames; returns how many input frames there were.
    ``ended(frames)`` is called once the input is used up, before the last piece is yielded."""
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
    if ended is not None:
        ended(frames)
    if resampler is not None and frames:
        tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        if tail.size:
            yield _to_s16le(tail)
    return frames


def _to_s16le(samples: np.ndarray) -> bytes:
    # Scaling by 2**15 is exact, so samples that came in as s16 go out bit for bit.
    scaled = np.rint(samples * np.float32(32768.0))
    return np.clip(scaled, -32768, 32767).astype("<i2").tobytes()


def _read_frames(stream: _Reads | None, ch: int, width: int, block_bytes: int) -> Iterator[np.ndarray]:
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
    said = re.sub(r"(?m)^pipe:0: ", "", said)  # the bytes came on ffmpeg's stdin: that name says nothing
    return " ".join(said.split())[-300:]


def _max_frames(max_seconds: float, rate: int) -> int:
    return int((max_seconds + PADDING_S) * rate)


def _spawn(args: list[str], stderr: IO[bytes], stdin: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """Start ffmpeg (tests wrap this to watch the process)."""
    return subprocess.Popen(args, stdin=stdin, stdout=subprocess.PIPE, stderr=stderr)


def _binary() -> str:
    binary = which(AudioSegment.converter)  # the ffmpeg pydub would use
    if binary is None:
        raise ConfigError(f"{AudioSegment.converter} is not installed; audio cannot be decoded")
    return binary


def _args(binary: str, path: str) -> list[str]:
    """ffmpeg decoding the first audio stream of ``path`` to a float WAV at its own rate on its stdout."""
    # The WAV header says the rate and channels of the first decoded frame; ffmpeg's encoder is
    # set up from them, and later frames that differ are converted to them: the layout cannot
    # drift mid-stream. -bitexact keeps ffmpeg's version out of the header.
    return [binary, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", path, "-map", "0:a:0",
            "-f", "wav", "-c:a", "pcm_f32le", "-bitexact", "pipe:1"]  # fmt: skip


_Decoding = tuple[subprocess.Popen[bytes], IO[bytes], Callable[[], None]]


def _fed_well() -> None:
    pass


@contextmanager
def _decoder(source: Source | Arriving, format: str | None, max_bytes: int,
             header: Header | None) -> Iterator[_Decoding]:
    """ffmpeg decoding ``source``, the file its stderr goes to, and a check that raises what
    went wrong feeding it its input (input that arrives in parts and went away mid-way); killed
    and reaped on exit.

    Bytes of a format ffmpeg reads from a pipe (:data:`PIPE_FORMATS`), and :class:`Arriving`
    bytes (their caller saw to the format), are written to its stdin by a thread of their own,
    and the process is the warm spare when there is one (:func:`keep_warm`); the rest is read
    from a file (bytes from a temp file)."""
    if _checked_size(source, max_bytes) == 0:
        raise AudioError("audio is empty: 0 bytes")
    if isinstance(source, Arriving):
        parts: Iterable[bytes] = _parts(source)
    elif isinstance(source, bytes | bytearray | memoryview) and header is not None \
            and header.format in PIPE_FORMATS:
        parts = (source,)
    else:
        with _as_path(source, format, max_bytes) as path, _ffmpeg(path) as (proc, stderr):
            yield proc, stderr, _fed_well
        return
    decoder = _piped(_args(_binary(), "pipe:0"))
    try:
        decoder.feed(parts)
        yield decoder.proc, decoder.stderr, decoder.fed
    finally:
        decoder.stop()


def _pipeable(data: bytes | bytearray | memoryview) -> bool:
    """Whether ffmpeg can decode ``data`` from a pipe: its content (not its name) is one of
    :data:`PIPE_FORMATS`. What the header check refuses goes the file's way, which words the error."""
    header = _header(data)
    return header is not None and header.format in PIPE_FORMATS


@contextmanager
def _ffmpeg(path: str) -> Iterator[tuple[subprocess.Popen[bytes], IO[bytes]]]:
    """ffmpeg decoding the first audio stream of ``path`` to a float WAV at its own rate on its
    stdout, killed on exit."""
    args = _args(_binary(), path)
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


# ffmpeg fed through its stdin, and the warm spare ----------------------------------------------

#: formats (as :func:`worker.sniff.look` names the content) that ffmpeg decodes from a pipe as
#: from a file: nothing in them needs seeking. mp4/m4a keep their index at either end and need a
#: seekable file; webm and the rest keep the temp file too.
PIPE_FORMATS = frozenset({"mp3", "aac", "ogg", "flac", "wav"})
#: bytes per write of the thread that feeds ffmpeg's stdin
_FEED_BLOCK = 64 * 1024
#: how long stopping a decoder waits for its feeding thread (ffmpeg is gone by then: it ends at once)
_FEED_JOIN_S = 5.0

log = logging.getLogger("echoq.audio")


class _Piped:
    """An ffmpeg reading its input from a pipe on its stdin, whose write end this holds."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.owner = os.getpid()  # a forked child never uses nor kills its parent's
        self.writer: threading.Thread | None = None
        #: what stopped the writer before the end of the input (not ffmpeg going away)
        self.failure: BaseException | None = None
        # stderr goes to an unnamed file: a pipe nobody reads could fill and stall ffmpeg.
        self.stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        try:
            read, write = os.pipe()  # neither end is inherited by processes started elsewhere
            try:
                self.proc = _spawn(args, self.stderr, stdin=read)
            except BaseException:
                os.close(write)
                raise
            finally:
                os.close(read)  # ffmpeg holds the only read end: when it exits, writes fail at once
        except BaseException:
            self.stderr.close()
            raise
        # unbuffered: a forked child can close its copy without flushing anything into ffmpeg
        self.stdin: IO[bytes] = open(write, "wb", buffering=0)  # noqa: SIM115 (closed by the writer or stop())
        with _lock:
            _feeds.add(self.stdin)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def feed(self, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        """Write each of ``parts`` in turn to ffmpeg's stdin on a thread of its own, each taken
        when the one before it is written, then close it (end of input). What taking a part
        raises stops the input there; :meth:`fed` raises it."""
        self.writer = threading.Thread(target=self._write, args=(parts,), name="echoq-ffmpeg-feed", daemon=True)
        self.writer.start()

    def _write(self, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        try:
            for part in parts:
                data = memoryview(part)
                try:
                    while data:
                        data = data[self.stdin.write(data[:_FEED_BLOCK]) or 0:]
                except OSError:  # BrokenPipeError among them: ffmpeg exited (bad input) or was killed early
                    return
        except BaseException as exc:  # the input went away: ffmpeg sees its end, the reader this
            self.failure = exc
        finally:
            close = getattr(parts, "close", None)
            if close is not None:
                close()  # a generator left mid-way lets go of what it reads from now
            _close_feed(self.stdin)

    def fed(self) -> None:
        """Raise what stopped the writer before the end of its input, if anything did."""
        if self.failure is not None:
            raise self.failure

    def stop(self) -> None:
        """Kill ffmpeg if it runs, reap it, let the writer finish; closes every file of it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.writer is None:
            _close_feed(self.stdin)
        else:  # the writer closes stdin itself: closing it under a blocked write could hit a reused fd
            self.writer.join(_FEED_JOIN_S)
            if self.writer.is_alive():
                log.warning("the thread feeding ffmpeg %d did not end within %.0fs", self.proc.pid, _FEED_JOIN_S)
        self.stderr.close()


def _close_feed(stdin: IO[bytes]) -> None:
    with _lock:
        _feeds.discard(stdin)
    with suppress(OSError):
        stdin.close()


_lock = threading.Lock()
#: write ends of ffmpeg stdin pipes open in this process (a forked child closes its copies)
_feeds: set[IO[bytes]] = set()
_warm = False
_spare: _Piped | None = None
_starting = False  # a thread is starting the next spare


def keep_warm(on: bool = True) -> None:
    """Keep one ffmpeg started ahead of need (``on``), or stop doing so and end the one kept.

    Starting ffmpeg costs about a tenth of a second (loading its libraries) before it reads a
    byte; a decode of bytes ffmpeg reads from a pipe (:data:`PIPE_FORMATS`) takes the spare,
    which waits on its stdin, and the next spare is started on a thread of its own. The first
    decode after this is called starts its own ffmpeg and leaves a spare behind.

    Off by default: a process that converts now and then (a producer, a script) should not keep
    an idle ffmpeg for its whole life; the worker turns it on (``ECHOQ_WARM_DECODER``). The
    output is the same either way: whether bytes go through a pipe depends on their content only.
    The spare belongs to the process that started it (a forked child starts its own) and is
    killed at exit; one left behind by a process that died ends by itself when its stdin closes.
    """
    global _warm, _spare
    with _lock:
        _warm = on
        spare, _spare = (_spare, None) if not on else (None, _spare)
    if spare is not None and spare.owner == os.getpid():
        spare.stop()


def _piped(args: list[str]) -> _Piped:
    """A pipe-fed ffmpeg with ``args``: the spare if it is alive, else a new one; starts the
    next spare when keeping one."""
    global _spare
    with _lock:
        spare, _spare = _spare, None
    if spare is not None and spare.owner != os.getpid():
        spare = None  # the parent's, copied by a fork: not this process's to use or to kill
    if spare is not None and (spare.args != args or not spare.alive()):
        spare.stop()  # died (or was killed) while waiting, or another ffmpeg is asked for: reaped, replaced
        spare = None
    decoder = spare if spare is not None else _Piped(args)
    _replenish(args)
    return decoder


def _replenish(args: list[str]) -> None:
    global _starting
    with _lock:
        if not _warm or _starting or _spare is not None:
            return
        _starting = True
    try:
        threading.Thread(target=_start_spare, args=(args,), name="echoq-ffmpeg-spare", daemon=True).start()
    except BaseException:
        with _lock:
            _starting = False
        raise


def _start_spare(args: list[str]) -> None:
    global _spare, _starting
    spare: _Piped | None = None
    try:
        spare = _Piped(args)
    except Exception as exc:  # the next decode starts its own and says what is wrong
        log.warning("no spare ffmpeg: %s", exc)
    finally:
        with _lock:
            _starting = False
            if spare is not None and _warm and _spare is None and spare.owner == os.getpid():
                _spare, spare = spare, None
    if spare is not None:  # turned off meanwhile, or a fork happened
        spare.stop()


def _at_exit() -> None:
    keep_warm(False)


def _after_fork_in_child() -> None:
    """A forked child keeps nothing of its parent's ffmpegs: it forgets the spare (the parent's
    to use and to kill) and closes its copies of the stdin pipes, which would otherwise keep
    the parent's decoders from ever seeing the end of their input."""
    global _lock, _spare, _starting
    _lock = threading.Lock()  # another thread may have held it at the fork
    _spare, _starting = None, False
    for stdin in list(_feeds):
        with suppress(OSError):
            stdin.close()
    _feeds.clear()


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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


def _checked_size(source: Source | Arriving, max_bytes: int) -> int:
    if isinstance(source, Arriving):
        size = source.size
    elif isinstance(source, bytes | bytearray | memoryview):
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
