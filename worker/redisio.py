"""Redis clients for echoq: redis-py, packing commands in C where that is cheaper.

redis-py packs every command in Python unless hiredis is installed, and then packs every command
with hiredis, which copies each argument into one buffer. A paced chunk is one small script call
(packing it in Python was about half of redis-py's time for it), while ``play()`` sends a whole
decoded file as one value (copying 10 MB is most of that call). So each command goes the cheaper
way: a command that carries a value larger than :data:`LARGE` goes redis-py's own way, which hands
the value to the socket as it is; every other command is packed by hiredis. Without hiredis,
everything goes redis-py's way, as it would anyway.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.connection import Encoder, PythonRespSerializer

try:
    from redis.connection import HiredisRespSerializer
    from redis.utils import HIREDIS_AVAILABLE
except ImportError:  # pragma: no cover - an older redis-py: its own packer only
    HIREDIS_AVAILABLE = False

#: a value longer than this (bytes) is not copied into the packed command
LARGE = 64 * 1024
#: redis-py's own cutoff for starting a new buffer (its ``Connection`` default)
_BUFFER_CUTOFF = 6000


class SplitPacker:
    """Packs a command with hiredis unless one of its arguments is a large value."""

    def __init__(self, large: int = LARGE) -> None:
        self.large = large
        # the encoder only turns arguments into bytes; replies are not decoded with it
        self._python = PythonRespSerializer(_BUFFER_CUTOFF, Encoder("utf-8", "strict", False).encode)
        self._c = HiredisRespSerializer() if HIREDIS_AVAILABLE else None

    def pack(self, *args: Any) -> list[Any]:
        if self._c is None:
            return self._python.pack(*args)
        large = self.large
        for arg in args:
            if isinstance(arg, (bytes, bytearray, memoryview, str)) and len(arg) > large:
                return self._python.pack(*args)
        return self._c.pack(*args)


#: stateless, so one serves every connection of the process
PACKER = SplitPacker()


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A client for ``url`` whose connections pack commands with :data:`PACKER`."""
    kwargs.setdefault("command_packer", PACKER)
    return redis.Redis.from_url(url, **kwargs)
