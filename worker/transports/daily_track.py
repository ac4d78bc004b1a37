"""Microphone echo's track: audio written into a Daily call as its microphone.

daily-python's virtual microphone (``Daily.create_microphone_device``) is the wrong tool here:
its ``write_frames`` does not block (and writes nothing) unless the device is live in a call,
and the SDK allows one active microphone per process while a worker holds many conversations.
A ``CustomAudioSource`` + ``CustomAudioTrack`` set as the call's microphone input
(``customTrack``) has neither problem: every call client has its own, and ``write_frames``
blocks for as long as the audio lasts and returns how many frames it took.

Writes are whole multiples of 10 ms (``ECHOQ_MIC_FRAME_MS``): the SDK pads anything else with
silence. A write that returns fewer frames than it was given is an error, never a silent
cursor move: the sender retries the frame.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidInput, SendFailed


class MicrophoneTrack:
    """One mono custom audio source at one sample rate, and the track that plays it."""

    def __init__(self, sdk: Any, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        # auto_silence: the track carries silence, not nothing, between utterances.
        self.source = sdk.CustomAudioSource(sample_rate, 1)
        self.track = sdk.CustomAudioTrack(self.source)

    @property
    def inputs(self) -> dict[str, Any]:
        """The ``update_inputs`` settings that make this track the call's microphone."""
        return {"camera": False, "microphone": {"isEnabled": True, "settings": {"customTrack": {"id": self.track.id}}}}

    #: The join turned microphone publishing off; an enabled input is silent without this.
    PUBLISHING: dict[str, Any] = {"microphone": {"isPublishing": True}}

    def write(self, pcm: bytes, room: str) -> None:
        """Write s16le mono PCM; blocks while it plays. :class:`SendFailed` on a short write."""
        if len(pcm) % 2:
            raise InvalidInput("pcm must be whole 16-bit samples (an even number of bytes)")
        expected = len(pcm) // 2
        written = self.source.write_frames(pcm)
        if written != expected:
            raise SendFailed(f"microphone track of daily room {room} took {written} of {expected} frames")
