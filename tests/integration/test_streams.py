"""Streaming utterances end to end: real Redis, real worker processes, the replica simulator."""

from __future__ import annotations

import time
import wave
from typing import Any

import numpy as np
import pytest
import redis

from tests.integration.conftest import Workers, heard_everything, wait_for, wire
from tests.integration.test_delivery import by_utterance, pcm_of, utterance_order
from worker import chunks

pytestmark = pytest.mark.redis

RATE = 24000
PIECE = chunks.chunk_bytes(RATE, 20)  # 20 ms of 24 kHz mono s16le


def voice(seconds: float, freq: float = 330.0, rate: int = RATE) -> bytes:
    """A tone whose samples never repeat a 20 ms piece (so a repeated or lost piece shows)."""
    t = np.arange(int(seconds * rate)) / rate
    ramp = np.linspace(0.2, 0.5, t.size)
    return (ramp * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def pieces_of(pcm: bytes, size: int = PIECE) -> list[bytes]:
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


def write_in_real_time(stream: Any, pieces: list[bytes], piece_s: float = 0.02,
                       before: Any = None) -> None:
    """Append each piece when its time comes, as a live source would."""
    t0 = time.monotonic()
    for i, piece in enumerate(pieces):
        if before is not None:
            before(i)
        delay = t0 + i * piece_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        stream.write(piece)


def echoes_of(client: redis.Redis, room: str, inference_id: str) -> list[dict[str, Any]]:
    return by_utterance(wire(client, room)).get(inference_id, [])


def test_real_time_20ms_pieces_are_reassembled_byte_exactly_under_one_inference_id(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis
) -> None:
    workers.start(1)
    client.open("st-a", "loopback://st-room-a")
    before = client.say("st-a", "Before the stream.")
    pcm = voice(1.5)
    pieces = pieces_of(pcm)
    on_wire_before_finish = []
    with client.stream("st-a", sample_rate=RATE) as s:
        after = client.say("st-a", "After the stream.")  # queued behind the open stream
        write_in_real_time(s, pieces[:-1])
        on_wire_before_finish = echoes_of(redis_client, "st-room-a", s.utterance_id)
        s.finish(pieces[-1])
    uid = s.utterance_id
    rec = client.wait(uid, timeout=30)
    assert rec["state"] in ("sent", "spoken") and rec["kind"] == "stream", rec
    assert client.wait(after, timeout=30)["state"] in ("sent", "spoken")

    messages = wire(redis_client, "st-room-a")
    assert utterance_order(messages) == [before, uid, after]
    mine = by_utterance(messages)[uid]
    # forwarded as it arrived: the room had audio of the stream before the producer finished it
    assert len(on_wire_before_finish) > 0
    assert [m["properties"]["done"] for m in mine] == [False] * (len(mine) - 1) + [True]
    assert {m["properties"]["sample_rate"] for m in mine} == {RATE}
    assert pcm_of(mine) == pieces  # one message per 20 ms piece, nothing held back, nothing cut across pieces

    report = heard_everything(simulator, redis_client, "st-room-a")
    assert report["violations"] == []
    heard = next(u for u in report["utterances"] if u["inference_id"] == uid)
    assert heard["done"] and heard["chunks"] == len(pieces)
    wait_for(lambda: heard.get("wav") or next(u for u in simulator.report()["rooms"]["st-room-a"]["utterances"]
                                              if u["inference_id"] == uid).get("wav"), 15, what="the WAV")
    wav_path = next(u for u in simulator.report()["rooms"]["st-room-a"]["utterances"] if u["inference_id"] == uid)["wav"]
    with wave.open(str(wav_path)) as w:
        assert w.getframerate() == RATE
        assert w.readframes(w.getnframes()) == pcm
