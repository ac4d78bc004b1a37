"""Converting audio that arrives in pieces: push a piece in, get the PCM it yields so far.

Two converters with one shape (``feed``, ``flush``, ``close``):

- :class:`PcmPieces`: raw s16le PCM at a stated rate and channel count, downmixed and resampled
  with soxr as in :mod:`worker.audio`; mono input already at the target rate passes through
  untouched, so a piece's audio can go out the moment it arrives.
- :class:`EncodedPieces`: any bytes ffmpeg can decode from a pipe (mp3, ogg, wav, flac, webm —
  not mp4/m4a, which need a seekable file), decoded by one ffmpeg process fed piece by piece.
  Its output only comes out in whole ``block`` sizes until :meth:`flush`, so the blocks do not
  depend on how fast ffmpeg happened to answer: converting the same pieces again gives the same
  blocks, which is what lets a new owner resume a stream by chunk index.

Both are deterministic for a given sequence of pieces.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
from typing import IO, Protocol

import numpy as np
import soxr
from pydub import AudioSegment
from pydub.utils import which

from .audio import QUALITY, _to_s16le
from .errors import AudioError, ConfigError

_S16 = 2


class Pieces(Protocol):
    """An incremental converter to s16le mono PCM at one target rate."""

    def feed(self, data: bytes) -> bytes:
        """Take one piece; returns the PCM ready so far (maybe empty)."""

    def ready(self) -> bytes:
        """PCM that became ready since the last call, without new input."""

    def flush(self) -> bytes:
        """The input has ended: everything that is left."""

    def close(self) -> None:
        """Free what the converter holds (idempotent)."""


class PcmPieces:
    """Raw s16le PCM pieces (whole frames each) to s16le mono at ``target_rate``."""

    def __init__(self, source_rate: int, channels: int, target_rate: int) -> None:
        if source_rate <= 0 or channels < 1:
            raise AudioError(f"raw PCM needs a positive rate and channel count, not {source_rate} Hz, {channels}")
        self.channels = channels
        self.frame = channels * _S16
        self.passthrough = channels == 1 and source_rate == target_rate
        # soxr's output does not depend on how its input is split: pieces resample as one signal
        self._resampler = None if source_rate == target_rate else soxr.ResampleStream(
            source_rate, target_rate, 1, "float32", QUALITY)

    def feed(self, data: bytes) -> bytes:
        if len(data) % self.frame:
            raise AudioError(f"a piece of {len(data)} bytes is not whole s16le frames of {self.channels} channel(s)")
        if self.passthrough or not data:
            return data
        block = (np.frombuffer(data, "<i2").astype(np.float32) / np.float32(32768.0)).reshape(-1, self.channels)
        mono = block[:, 0] if self.channels == 1 else block.mean(axis=1, dtype=np.float32)
        out = mono if self._resampler is None else self._resampler.resample_chunk(mono)
        return _to_s16le(out) if out.size else b""

    def ready(self) -> bytes:
        return b""

    def flush(self) -> bytes:
        if self._resampler is None:
            return b""
        tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        return _to_s16le(tail) if tail.size else b""

    def close(self) -> None:
        self._resampler = None


class EncodedPieces:
    """Encoded pieces decoded by one ffmpeg process; output in whole ``block`` sizes until the end."""

    def __init__(self, target_rate: int, block: int, format: str | None = None) -> None:
        binary = which(AudioSegment.converter)
        if binary is None:
            raise ConfigError(f"{AudioSegment.converter} is not installed; audio cannot be decoded")
        if block <= 0 or block % _S16:
            raise ValueError(f"block must be a positive even number of bytes, not {block}")
        self.block = block
        fmt = ["-f", format] if format and format.isalnum() else []
        # soxr inside ffmpeg: the input rate is only known once ffmpeg has probed the pipe. A small
        # probe: by default ffmpeg reads about 1.5 s of an mp3 before it decodes anything
        args = [binary, "-hide_banner", "-loglevel", "error", "-probesize", "4096", "-analyzeduration", "0",
                *fmt, "-i", "pipe:0", "-map", "0:a:0",
                "-af", "aresample=resampler=soxr", "-ac", "1", "-ar", str(target_rate),
                "-f", "s16le", "-c:a", "pcm_s16le", "pipe:1"]  # fmt: skip
        # stderr goes to an unnamed file (closed in close()): a pipe nobody reads could stall ffmpeg
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self._buf = bytearray()
        self._lock = threading.Lock()
        # a thread drains stdout, so ffmpeg never blocks on a full pipe while we write its input
        self._reader = threading.Thread(target=self._read, name="echoq-stream-decode", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        out = self._proc.stdout
        assert out is not None
        # os.read returns what ffmpeg has written so far, not a full buffer
        while data := os.read(out.fileno(), 64 * 1024):
            with self._lock:
                self._buf += data

    def _take(self, everything: bool = False) -> bytes:
        with self._lock:
            n = len(self._buf) if everything else len(self._buf) - len(self._buf) % self.block
            if everything and n % _S16:
                n -= n % _S16
            out = bytes(self._buf[:n])
            del self._buf[:n]
        return out

    def feed(self, data: bytes) -> bytes:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            stdin.write(data)
            stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise AudioError(f"audio is unreadable: ffmpeg stopped decoding the stream ({self._detail()})") from exc
        return self._take()

    def ready(self) -> bytes:
        return self._take()

    def flush(self) -> bytes:
        stdin = self._proc.stdin
        assert stdin is not None
        with contextlib.suppress(BrokenPipeError):
            stdin.close()
        self._reader.join()
        if self._proc.wait() != 0:
            raise AudioError(f"audio is unreadable: ffmpeg could not decode the stream ({self._detail()})")
        return self._take(everything=True)

    def _detail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace").strip()[-300:]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._stderr.close()
