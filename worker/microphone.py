"""Microphone echo: a conversation's audio written into the room as a microphone track.

In this Tavus mode the persona's transport has the microphone enabled and the replica speaks
what it hears on the track; Tavus's own speech layers are bypassed and "all interrupt logic must
be embedded in your audio stream" (PROTOCOL.md). So :class:`MicrophoneSender` differs from the
app-message :class:`~worker.sender.Sender` only in how one log entry reaches the room:

- Audio is converted exactly as for echo messages, cut into frames of ``mic_frame_ms`` and
  written with ``transport.write_frames`` at real-time pace: a monotonic schedule that lets the
  audio run at most ``mic_max_lead_ms`` ahead of real time (:class:`FrameClock`). The cursor
  moves after every frame, with the echo sender's lease fencing, interrupt check and retries,
  so a worker that dies mid-utterance is replaced and the next one resumes at the next frame
  (at most the frame in flight is written twice).
- Back-to-back utterances are separated by ``mic_gap_ms`` of written silence, so the track
  keeps its real-time cadence across the boundary. When the track has been quiet for longer than
  that gap already, nothing is written: the room has heard silence anyway.
- The next utterance's audio is converted on a thread of its own while the current one plays
  (:class:`FrameReader`): starting a decode takes about a tenth of a second, which would
  otherwise leave a hole in the track between utterances.
- Text cannot be spoken (there is no text-to-speech here): a text entry fails its utterance
  with a :class:`~worker.errors.PermanentError` and the conversation goes on.
- An interrupt stops the frames at once (no frame after the one in flight) and the queued
  utterances are cancelled, as in echo mode. No ``conversation.interrupt`` app message is sent:
  in this mode the stream *is* the interrupt — the replica stops because the audio stops.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from . import chunks
from .errors import PermanentError, RetryableError
from .logs import ms_since, step
from .readahead import ReadAhead as FrameReader
from .sender import Progress, Sender, SendExhausted

log = logging.getLogger("echoq.microphone")



class FrameClock:
    """When the next microphone frame may be written: real time, at most ``max_lead_s`` ahead.

    The schedule is anchored at the first frame: a frame may go once the audio already written
    is no more than ``max_lead_s`` ahead of the time since the anchor. A writer a little late
    (up to ``slack_s``) catches up; one later than that — the audio has run out, the room heard
    a hole — starts a new schedule instead of bursting to make up for lost time.
    """

    def __init__(self, max_lead_s: float, slack_s: float, now: Callable[[], float] = time.monotonic) -> None:
        self.max_lead_s = max_lead_s
        self.slack_s = slack_s
        self._now = now
        self._anchor: float | None = None
        self._written = 0.0

    def due(self) -> float:
        """The monotonic time at which the next frame may be written (re-anchoring when stalled)."""
        now = self._now()
        if self._anchor is None or now > self._anchor + self._written + self.slack_s:
            self._anchor, self._written = now, 0.0
        return self._anchor + self._written - self.max_lead_s

    def wrote(self, seconds: float) -> None:
        """Count ``seconds`` of audio as written."""
        self._written += seconds

    def since_end(self) -> float:
        """Seconds since the audio written so far ran out (negative while it plays; inf if none)."""
        if self._anchor is None:
            return math.inf
        return self._now() - (self._anchor + self._written)


class MicrophoneSender(Sender):
    """Sends a microphone-mode conversation's log into its room as a real-time microphone track."""

    def __init__(self, conversation_id: str, **kwargs: Any) -> None:
        super().__init__(conversation_id, **kwargs)
        # frames go to the room's microphone, not through send(): each cursor move is its own
        # round trip after the write, and interrupts are looked up as the echo sender once did
        self.folds = False
        settings = self.settings
        # the echo sender's conversion (_pcm_chunks) cuts chunks of chunk_ms: here, mic frames
        self.chunk_ms = settings.mic_frame_ms
        frame_s = settings.mic_frame_ms / 1000
        self.gap_ms = settings.mic_gap_ms
        self.clock = FrameClock(settings.mic_max_lead_ms / 1000, slack_s=frame_s)
        self._ahead = max(4, math.ceil(1000 / settings.mic_frame_ms))  # about a second of frames
        self._next: FrameReader | None = None

    # the loop ------------------------------------------------------------------------------

    def drain(self, progress: Progress | None = None) -> int:
        """Send every entry after the cursor; a reader started ahead is stopped on the way out."""
        try:
            return super().drain(progress)
        finally:
            self._drop_prefetch()

    def _cut_playing(self, done_seq: int, lookback: int = 32) -> None:
        # Written at real time, a sent utterance has been played: there is nothing left to cut.
        return

    def _announce_interrupt(self) -> None:
        # The stream is the interrupt in this mode: its frames have stopped. The audio converted
        # ahead belongs to an utterance the interrupt has just cancelled.
        self._drop_prefetch()

    # one entry -----------------------------------------------------------------------------

    def _send_text(self, entry: dict[str, Any]) -> int:
        raise PermanentError(
            "text cannot be spoken in microphone mode (there is no text-to-speech): send audio, "
            "or open the conversation in echo mode"
        )

    def _send_audio(self, entry: dict[str, Any], first_chunk: int, progress: Progress | None) -> int:
        seq, rate = int(entry["seq"]), int(entry["sample_rate"])
        estimate = entry.get("chunks_estimate")
        total = math.ceil(int(estimate) * self.settings.chunk_ms / self.chunk_ms) if estimate else None
        reader = self._reader_for(entry)
        self._prefetch_after(seq)
        try:
            if first_chunk == 0 and self.gap_ms and self.clock.since_end() < self.gap_ms / 1000:
                self._write_silence(rate, entry)
            return self._deliver(entry, reader.frames(), first_chunk, lambda pcm, _last: self._write(pcm, rate, entry),
                                 progress, total, every=50)
        finally:
            reader.close()

    def _reader_for(self, entry: dict[str, Any]) -> FrameReader:
        """The reader started ahead for this entry, or a new one."""
        uid = entry["utterance_id"]
        ahead, self._next = self._next, None
        if ahead is not None and ahead.utterance_id == uid:
            return ahead
        if ahead is not None:
            ahead.close()
        return FrameReader(uid, lambda: self._pcm_chunks(entry), self._ahead)

    def _prefetch_after(self, seq: int) -> None:
        """Start converting the entry after ``seq`` while this one plays, if it is audio."""
        following = self.store.entries_after(self.cid, seq, count=1)
        if not following or following[0].get("kind") != "audio":
            return
        entry = following[0]
        self._next = FrameReader(entry["utterance_id"], lambda: self._pcm_chunks(entry), self._ahead)

    def _drop_prefetch(self) -> None:
        ahead, self._next = self._next, None
        if ahead is not None:
            ahead.close()

    def _write_silence(self, rate: int, entry: dict[str, Any]) -> None:
        """``mic_gap_ms`` of silence before an utterance that follows another one directly."""
        silence = b"\0" * chunks.chunk_bytes(rate, self.gap_ms)
        for frame in chunks.rechunk([silence], chunks.chunk_bytes(rate, self.chunk_ms)):
            self._check_interrupt()
            self._write(frame, rate, entry)

    # one frame -----------------------------------------------------------------------------

    def _pace(self) -> None:
        """Wait for the next frame's slot; an interrupt ends the wait at once."""
        due = self.clock.due()
        while (delay := due - time.monotonic()) > 0:
            if self.wake.wait(delay):
                # woken by an interrupt (or a stop, which lets the utterance finish at pace)
                self.wake.clear()
                self._check_interrupt()

    def _write(self, pcm: bytes, rate: int, entry: dict[str, Any]) -> None:
        """Write one frame at its slot, with retries; rejoin the room when the connection is gone."""
        s = self.settings
        for attempt in range(s.retry_max_attempts):
            self._pace()
            t0 = time.monotonic()
            try:
                if not self.transport.connected:
                    self.transport.rejoin(s.join_timeout_s)
                    step(log, "rejoined", conversation=self.cid, ms=ms_since(t0))
                self._fenced()  # the same fence as every app message: a stale owner writes nothing
                self.transport.write_frames(pcm, rate)
            except RetryableError as exc:  # a lost room (RoomDisconnected, JoinFailed) included
                self._backoff(attempt, type(exc).__name__, exc)
                continue
            self.clock.wrote(len(pcm) / (2 * rate))
            self._note_first(entry)
            return
        raise SendExhausted(f"gave up on a microphone frame to {self.cid} after {s.retry_max_attempts} attempts")
