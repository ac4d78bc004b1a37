"""Microphone frames of one loopback room: reassembly and pacing figures. Pure: no I/O.

Each frame carries s16le mono PCM, its sample rate and ``t``, the sender's wall time in
seconds when it wrote the frame. The track measures pacing as a listener would hear it: a
player that starts with the first frame, plays in real time, and waits whenever its buffer
runs dry (the way a room's audio track plays a microphone):

- ``audio_seconds``: the audio in all frames;
- ``wall_seconds``: from the first frame's ``t`` to the last frame's ``t`` plus that last
  frame's duration, so a sender that keeps real time has ``wall_seconds ≈ audio_seconds``;
- ``max_gap``: the longest time that player had nothing to play (a frame arrived after the
  audio before it had run out); a sender that keeps a lead can pause that long without a gap;
- ``max_lead``: the most audio that was written but not yet played when a frame arrived: how
  far the sender ran ahead of real time (0 for a sender that writes exactly in real time,
  nearly all of the audio for one that bursts).
"""

from __future__ import annotations

from typing import Any


class MicTrack:
    """The microphone audio of one room, in arrival order."""

    def __init__(self) -> None:
        self.frames = 0
        self.sample_rate: int | None = None
        self.pcm = bytearray()
        self.audio_seconds = 0.0
        self.max_gap = 0.0
        self.max_lead = 0.0
        self._first_t: float | None = None
        self._last_t = 0.0
        self._last_duration = 0.0
        self._play_end = 0.0  # when the player runs out of what it has been given

    def add(self, pcm: bytes, sample_rate: int, t: float) -> str | None:
        """Take one frame; a problem (and the frame left out) when it does not fit the track."""
        if sample_rate <= 0:
            return f"mic frame sample_rate is {sample_rate}"
        if len(pcm) % 2:
            return "mic frame has an odd number of bytes (not s16le)"
        if self.sample_rate is None:
            self.sample_rate = sample_rate
        elif sample_rate != self.sample_rate:
            return f"mic sample_rate changed from {self.sample_rate} to {sample_rate}"
        duration = len(pcm) / 2 / sample_rate
        if self._first_t is None:
            self._first_t = self._play_end = t
        self.max_gap = max(self.max_gap, t - self._play_end)
        self.max_lead = max(self.max_lead, self._play_end - t)
        self._play_end = max(self._play_end, t) + duration
        self.audio_seconds += duration
        self._last_t = t
        self._last_duration = duration
        self.pcm += pcm
        self.frames += 1
        return None

    @property
    def wall_seconds(self) -> float:
        if self._first_t is None:
            return 0.0
        return self._last_t - self._first_t + self._last_duration

    def as_dict(self, wav: str | None) -> dict[str, Any]:
        """The track's figures for the report."""
        return {
            "frames": self.frames,
            "sample_rate": self.sample_rate,
            "bytes": len(self.pcm),
            "audio_seconds": round(self.audio_seconds, 4),
            "wall_seconds": round(self.wall_seconds, 4),
            "max_gap": round(self.max_gap, 4),
            "max_lead": round(self.max_lead, 4),
            "wav": wav,
        }
