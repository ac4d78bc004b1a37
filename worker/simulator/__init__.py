"""The replica simulator: the other side of a ``loopback://`` room.

``replica`` reads the rooms and answers as a Tavus replica would, ``room`` holds the protocol
rules and the playback of one room, ``mic`` the microphone-echo pacing figures, ``files`` the
WAV and JSON files it writes.
"""

from .replica import Simulator

__all__ = ["Simulator"]
