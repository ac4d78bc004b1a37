"""The command packer: small commands in C, large values handed on without a copy."""

from __future__ import annotations

import pytest
import redis
from redis.connection import Encoder, PythonRespSerializer

from worker import redisio


def _python() -> PythonRespSerializer:
    return PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


def test_hiredis_is_installed_so_small_commands_and_replies_go_through_c() -> None:
    """The dependency on redis[hiredis] is what makes a paced chunk's client side cheap."""
    assert redisio.HIREDIS_AVAILABLE
    connection = redisio.connect("redis://127.0.0.1:1/0").connection_pool.make_connection()
    assert connection._command_packer is redisio.PACKER
    assert type(connection._parser).__name__ == "_HiredisParser"


def test_a_small_command_packs_to_the_same_bytes_either_way() -> None:
    args = ("EVALSHA", "ab" * 20, 3, "echoq:k1", b"echoq:k2", "k3", 17, 2.5, "é", b"\x00\xff")
    packed = redisio.PACKER.pack(*args)
    assert len(packed) == 1  # one buffer: hiredis's
    assert b"".join(packed) == b"".join(_python().pack(*args))


def test_a_large_value_goes_to_the_socket_as_it_is_not_copied() -> None:
    blob = bytes(range(256)) * (redisio.LARGE // 256 + 1)
    packed = redisio.PACKER.pack("SET", "echoq:blob:u", blob, "EX", 60)
    assert any(part is blob for part in packed), "the value was copied into the packed command"
    assert b"".join(packed) == b"".join(_python().pack("SET", "echoq:blob:u", blob, "EX", 60))
    view = memoryview(blob)
    assert any(part is view for part in redisio.PACKER.pack("SET", "k", view))


def test_without_hiredis_every_command_goes_redis_pys_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redisio, "HIREDIS_AVAILABLE", False)
    packer = redisio.SplitPacker()
    assert packer.pack("GET", "k") == _python().pack("GET", "k")


@pytest.mark.redis
def test_a_pipeline_of_mixed_commands_round_trips(redis_client: redis.Redis, redis_url: str) -> None:
    """Through a real server: small and large values in one pipeline come back as sent."""
    r = redisio.connect(redis_url)
    blob = b"\x01\x02" * (redisio.LARGE)
    pipe = r.pipeline(transaction=False)
    pipe.set("echoq:test:small", "x" * 10)
    pipe.set("echoq:test:large", blob)
    pipe.get("echoq:test:small")
    pipe.get("echoq:test:large")
    pipe.delete("echoq:test:small", "echoq:test:large")
    assert pipe.execute() == [True, True, b"x" * 10, blob, 2]
