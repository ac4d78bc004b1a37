"""Streaming utterances end to end: real Redis, real worker processes, the replica simulator."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import ROOT, Workers, heard_everything, wait_for, wire
from tests.integration.test_api import Api, field_of, serve, sse_events  # noqa: F401  (serve is a fixture)
from tests.integration.test_delivery import by_utterance, pcm_of, utterance_order
from worker import chunks, keys

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


def test_an_interrupt_cuts_a_stream_nothing_follows_it_and_later_appends_are_refused(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis
) -> None:
    from producer.streams import StreamClosed

    workers.start(1)
    client.open("st-i", "loopback://st-room-i")
    pieces = pieces_of(voice(2.0))
    s = client.stream("st-i", sample_rate=RATE)
    queued = client.say("st-i", "Queued behind the stream.")
    write_in_real_time(s, pieces[:20])
    wait_for(lambda: len(echoes_of(redis_client, "st-room-i", s.utterance_id)) >= 5, 20, what="the stream on the wire")
    cancelled = client.interrupt("st-i")
    assert cancelled == 1, (client.status(queued), client.conversation("st-i"))  # the text queued behind it
    with pytest.raises(StreamClosed, match="interrupted"):
        s.write(pieces[20])
    with pytest.raises(StreamClosed, match="interrupted"):
        s.finish()
    wait_for(lambda: client.status(s.utterance_id)["state"] == "interrupted", 20, what="the stream to be interrupted")
    fresh = client.say("st-i", "A fresh start.")
    rec = client.wait(fresh, timeout=20)
    assert rec["state"] in ("sent", "spoken"), (rec, client.conversation("st-i"))

    messages = wire(redis_client, "st-room-i")
    cut_at = next(i for i, m in enumerate(messages) if m["event_type"] == "conversation.interrupt")
    assert [m["properties"]["inference_id"] for m in messages[cut_at + 1 :]] == [fresh]
    mine = by_utterance(messages)[s.utterance_id]
    assert not any(m["properties"]["done"] for m in mine)
    assert pcm_of(mine) == pieces[: len(mine)]  # in order, nothing lost before the cut
    assert client.status(queued)["state"] == "cancelled"
    assert heard_everything(simulator, redis_client, "st-room-i")["violations"] == []


def test_kill_9_of_the_owner_mid_stream_the_next_owner_continues_under_the_same_inference_id(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis
) -> None:
    workers.start(2)
    client.open("st-k", "loopback://st-room-k")
    pcm = voice(4.0, freq=250)
    pieces = pieces_of(pcm)
    killed: list[Any] = []

    def kill_the_owner_at(i: int) -> None:
        if i == 60:  # 1.2 s in: the producer goes on appending while nobody owns the room
            victim = workers.owner("st-k")
            assert victim is not None
            victim.proc.kill()
            victim.proc.wait(10)
            killed.append(victim)

    with client.stream("st-k", sample_rate=RATE) as s:
        after = client.say("st-k", "After the stream.")
        write_in_real_time(s, pieces, before=kill_the_owner_at)
    rec = client.wait(s.utterance_id, timeout=60)
    assert rec["state"] in ("sent", "spoken"), rec
    assert client.wait(after, timeout=30)["state"] in ("sent", "spoken")
    assert workers.owner("st-k") is not killed[0]

    messages = wire(redis_client, "st-room-k")
    assert utterance_order(messages) == [s.utterance_id, after]
    mine = by_utterance(messages)[s.utterance_id]
    got = pcm_of(mine)
    tail = b"\0" * chunks.chunk_bytes(RATE, 40)  # finished without a last piece: 40 ms of silence carry done
    assert got[-1] == tail
    got = got[:-1]
    # nothing lost, at most one chunk repeated (the one in flight when the owner died)
    assert len(got) - len(pieces) in (0, 1)
    if len(got) == len(pieces) + 1:
        dup = next(i for i in range(1, len(got)) if got[i] == got[i - 1])
        got = got[:dup] + got[dup + 1 :]
    assert got == pieces
    dones = [m["properties"]["done"] for m in mine]
    assert dones.count(True) == 1 and dones[-1] is True


def test_asyncio_code_streams_with_async_with_and_awrite(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis
) -> None:
    workers.start(1)
    client.open("st-y", "loopback://st-room-y")
    pieces = pieces_of(voice(0.3))

    async def produce() -> str:
        async with client.stream("st-y", sample_rate=RATE, inference_id="async-1") as s:
            for piece in pieces:
                await s.awrite(piece)
                await asyncio.sleep(0.02)
        return str(s.utterance_id)

    uid = asyncio.run(produce())
    assert client.wait(uid, timeout=20)["state"] in ("sent", "spoken")
    got = pcm_of(echoes_of(redis_client, "st-room-y", "async-1"))
    assert got == [*pieces, b"\0" * chunks.chunk_bytes(RATE, 40)]  # leaving the block finished it


def test_sigterm_of_the_owner_mid_stream_hands_it_over_with_nothing_lost_or_repeated(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis
) -> None:
    workers.start(2)
    client.open("st-t", "loopback://st-room-t")
    pieces = pieces_of(voice(2.0, freq=280))
    stopped: list[Any] = []

    def stop_the_owner_at(i: int) -> None:
        if i == 40:
            owner = workers.owner("st-t")
            assert owner is not None
            owner.proc.terminate()  # warm shutdown while the stream is open; the producer goes on
            stopped.append(owner)

    with client.stream("st-t", sample_rate=RATE) as s:
        write_in_real_time(s, pieces[:-1], before=stop_the_owner_at)
        s.finish(pieces[-1])
    assert stopped and client.wait(s.utterance_id, timeout=60)["state"] in ("sent", "spoken")
    (old,) = stopped  # it may still be leaving its rooms when the new owner has sent the rest
    # it stopped mid-stream, between two chunks (sender.stopped) or waiting for a piece (a hand-over)
    assert old.proc.wait(30) == 0 and ("sender.stopped" in old.log() or "worker stopping" in old.log())
    assert pcm_of(echoes_of(redis_client, "st-room-t", s.utterance_id)) == pieces  # each piece exactly once
    # and the next owner sent the rest: the room's stream names two senders, the old one first
    senders = [fields[b"origin"].decode().split(":")[0] for _id, fields in redis_client.xrange(keys.loopback_room("st-room-t"))]
    assert senders[0] == old.name and len(dict.fromkeys(senders)) == 2, dict.fromkeys(senders)


def test_an_abandoned_stream_is_finished_after_the_idle_time_and_the_next_utterance_plays(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis
) -> None:
    from producer.streams import StreamClosed

    workers.start(1, ECHOQ_STREAM_IDLE_S="1")
    client.open("st-d", "loopback://st-room-d")
    pieces = pieces_of(voice(0.2))
    s = client.stream("st-d", sample_rate=RATE)
    for piece in pieces:
        s.write(piece)
    nxt = client.say("st-d", "The conversation goes on.")  # the producer is gone; this waits for the idle time
    assert client.wait(nxt, timeout=30)["state"] in ("sent", "spoken")
    rec = client.status(s.utterance_id)
    assert rec["stream_state"] == "idle" and rec["state"] in ("sent", "spoken"), rec
    with pytest.raises(StreamClosed, match="without a piece"):
        s.write(pieces[0])

    messages = wire(redis_client, "st-room-d")
    assert utterance_order(messages) == [s.utterance_id, nxt]
    mine = by_utterance(messages)[s.utterance_id]
    assert pcm_of(mine) == [*pieces, b"\0" * chunks.chunk_bytes(RATE, 40)]
    assert [m["properties"]["done"] for m in mine].count(True) == 1 and mine[-1]["properties"]["done"] is True
    events = [e["type"] for _id, e in client.events("st-d")]
    assert events.count("stream.piece") == len(pieces)


def test_bad_pieces_get_clear_errors_and_break_nothing(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis
) -> None:
    from producer.streams import StreamClosed, StreamCut
    from worker.errors import InvalidInput, UnknownConversation

    # 1 s streams at most: the limit is reached by a test in a moment
    workers.start(1, ECHOQ_MAX_AUDIO_SECONDS="1")
    # a copy: the client's settings are the process-wide ones, which later tests read too
    client.settings = client.settings.model_copy(update={"max_audio_seconds": 1.0})
    client.open("st-b", "loopback://st-room-b")
    client.open("st-m", "loopback://st-room-m", mode="microphone")
    with pytest.raises(UnknownConversation):
        client.stream("nope", sample_rate=RATE)
    with pytest.raises(InvalidInput, match="16000 or 24000"):
        client.stream("st-b", sample_rate=44100)
    with pytest.raises(InvalidInput, match="microphone"):
        client.stream("st-m", sample_rate=RATE)
    with pytest.raises(StreamClosed, match="no stream"):
        client.append("never-opened", b"\0\0")

    s = client.stream("st-b", sample_rate=RATE)
    good = pieces_of(voice(0.6))
    s.write(good[0])
    with pytest.raises(InvalidInput, match="odd byte count"):
        s.write(good[1][:-1])
    with pytest.raises(InvalidInput, match="16000 Hz but stream .* is at 24000 Hz"):
        s.write(good[1], rate=16000)
    with pytest.raises(InvalidInput, match="empty"):
        s.write(b"")
    for piece in good[1:]:
        s.write(piece, rate=RATE)
    s.finish()
    assert client.wait(s.utterance_id, timeout=20)["state"] in ("sent", "spoken")
    with pytest.raises(StreamClosed, match="finished"):
        s.write(good[0])
    with pytest.raises(StreamClosed, match="finished"):
        client.finish(s.utterance_id)
    with pytest.raises(StreamClosed, match="not a stream"):
        client.append(client.say("st-b", "Whole."), good[0])

    # longer than the limit: refused, cut cleanly on the wire, and the conversation goes on
    long = client.stream("st-b", sample_rate=RATE)
    with pytest.raises(StreamCut, match="over the limit"):
        for piece in pieces_of(voice(1.5)):
            long.write(piece)
    with pytest.raises(StreamClosed, match="cut"):
        long.write(good[0])
    rec = client.wait(long.utterance_id, timeout=20)
    assert rec["state"] == "failed" and "limit" in rec["error"], rec
    after = client.say("st-b", "Still here.")
    assert client.wait(after, timeout=20)["state"] in ("sent", "spoken")

    messages = wire(redis_client, "st-room-b")
    mine = by_utterance(messages)[long.utterance_id]
    cut_at = next(i for i, m in enumerate(messages) if m["event_type"] == "conversation.interrupt")
    assert messages[cut_at - 1]["properties"]["inference_id"] == long.utterance_id
    assert not any(m["properties"]["done"] for m in mine)
    assert [m["properties"].get("inference_id") for m in messages[cut_at + 1 :]] == [after]
    first = by_utterance(messages)[s.utterance_id]
    assert pcm_of(first)[:-1] == good
    assert heard_everything(simulator, redis_client, "st-room-b")["violations"] == []


# --- HTTP --------------------------------------------------------------------------------------


@pytest.fixture
def api(serve: Any) -> Api:  # noqa: F811  (the imported fixture, by name)
    return serve()


def test_the_quickstart_body_in_several_requests_is_spoken_as_one_utterance(
    workers: Workers, simulator: Any, api: Api, redis_client: redis.Redis
) -> None:
    workers.start(1)
    assert api.http.post("/v1/conversations", json={"conversation_id": "st-q", "url": "loopback://st-room-q"}).status_code == 201
    pcm = voice(0.6)
    parts = pieces_of(pcm, 4800)  # 100 ms per request
    base = {"message_type": "conversation", "event_type": "conversation.echo", "conversation_id": "st-q"}
    answers = []
    for i, part in enumerate(parts):
        done = "true" if i == len(parts) - 1 else "false"
        props = {"modality": "audio", "audio": base64.b64encode(part).decode(), "sample_rate": RATE,
                 "inference_id": "qs-stream-1", "done": done}
        r = api.http.post("/send_text_message", json={**base, "properties": props})
        assert r.status_code == 200, r.text
        answers.append(r.json())
    assert {a["utterance_id"] for a in answers} == {answers[0]["utterance_id"]}
    assert [a["state"] for a in answers] == ["streaming"] * (len(parts) - 1) + ["finished"]
    api.wait_state(answers[0]["utterance_id"])

    mine = by_utterance(wire(redis_client, "st-room-q"))["qs-stream-1"]
    assert b"".join(pcm_of(mine)) == pcm  # the last request carried audio: its last chunk carries done
    assert [m["properties"]["done"] for m in mine] == [False] * (len(mine) - 1) + [True]
    report = heard_everything(simulator, redis_client, "st-room-q")
    assert [u["inference_id"] for u in report["utterances"]] == ["qs-stream-1"] and report["violations"] == []

    # a finished stream takes no more; text cannot stream; a stream needs its inference_id
    props = {"modality": "audio", "audio": base64.b64encode(parts[0]).decode(), "sample_rate": RATE,
             "inference_id": "qs-stream-1", "done": "false"}
    r = api.http.post("/send_text_message", json={**base, "properties": props})
    assert r.status_code == 409 and "finished" in r.json()["detail"], r.text
    r = api.http.post("/send_text_message", json={**base, "properties": {**props, "inference_id": None}})
    assert field_of(r) == ["body", "properties", "inference_id"]
    r = api.http.post("/send_text_message", json={**base, "properties": {**props, "inference_id": "odd", "audio": base64.b64encode(b"\0" * 3).decode()}})
    assert field_of(r) == ["body", "properties", "audio"] and "odd byte count" in r.text
    r = api.http.post("/send_text_message", json={**base, "properties": {"modality": "text", "text": "Hi", "done": False}})
    assert field_of(r) == ["body", "properties", "done"] and "Tavus" in r.text


def test_the_streams_resource_appends_chunked_bodies_and_the_sse_stream_reports_each_piece(
    workers: Workers, simulator: Any, api: Api, redis_client: redis.Redis
) -> None:
    workers.start(1)
    assert api.http.post("/v1/conversations", json={"conversation_id": "st-r", "url": "loopback://st-room-r"}).status_code == 201
    r = api.http.post("/v1/conversations/st-r/streams", json={"sample_rate": RATE, "inference_id": "rest-1"})
    assert r.status_code == 201, r.text
    uid = r.json()["utterance_id"]
    pcm = voice(0.4)
    pieces = pieces_of(pcm)

    def body() -> Any:  # a chunked request body, produced while it is sent (7 bytes + ... splits frames)
        yield pieces[0][:7]
        yield pieces[0][7:]
        for piece in pieces[1:-1]:
            time.sleep(0.02)
            yield piece

    r = api.http.post(f"/v1/conversations/st-r/streams/{uid}/pieces", content=body(),
                      headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.json()["bytes"] == len(pcm) - len(pieces[-1]) and not r.json()["finished"]
    r = api.http.post(f"/v1/conversations/st-r/streams/{uid}/finish", content=pieces[-1])
    assert r.status_code == 200 and r.json()["finished"], r.text
    api.wait_state(uid)
    mine = by_utterance(wire(redis_client, "st-room-r"))["rest-1"]
    assert b"".join(pcm_of(mine)) == pcm

    # piece progress on the conversation's server-sent events
    kept = redis_client.xlen(keys.conv_events("st-r"))
    with api.http.stream("GET", "/v1/conversations/st-r/events", params={"limit": kept}) as resp:
        events = [e for _id, e in sse_events(resp) if e["type"] in ("stream.piece", "utterance.sent")]
    piece_events = [e for e in events if e["type"] == "stream.piece"]
    assert [e["piece"] for e in piece_events] == list(range(1, len(piece_events) + 1))
    assert piece_events and all(e["utterance_id"] == uid for e in piece_events)
    assert piece_events[-1]["chunks_sent"] <= len(mine)

    # refusals: unknown stream 404, finished 409, odd body 422, unknown conversation 404
    assert api.http.post("/v1/conversations/st-r/streams/nope/pieces", content=b"\0\0").status_code == 404
    r = api.http.post(f"/v1/conversations/st-r/streams/{uid}/pieces", content=b"\0\0")
    assert r.status_code == 409 and "finished" in r.json()["detail"]
    other = api.http.post("/v1/conversations/st-r/streams", json={}).json()["utterance_id"]
    r = api.http.post(f"/v1/conversations/st-r/streams/{other}/pieces", content=b"\0\0\0")
    assert r.status_code == 422 and "sample frame" in r.text
    assert api.http.post("/v1/conversations/nobody/streams", json={}).status_code == 404
    assert api.http.post(f"/v1/conversations/st-r/streams/{other}/finish").status_code == 200


# --- CLI and encoded pieces ----------------------------------------------------------------------


def test_echoq_play_dash_streams_stdin_as_it_arrives(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis
) -> None:
    workers.start(1)
    client.open("st-c", "loopback://st-room-c")
    pcm = voice(0.8)
    pieces = pieces_of(pcm)
    env = {**os.environ, "ECHOQ_REDIS_URL": TEST_REDIS_URL}
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "play", "st-c", "-", "--raw-rate", "24000",
                             "--inference-id", "cli-stream", "--wait", "--timeout", "30"],
                            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    half = len(pieces) // 2
    for piece in pieces[:half]:
        proc.stdin.write(piece[:5])  # writes that split samples: the reader keeps whole frames
        proc.stdin.write(piece[5:])
        proc.stdin.flush()
        time.sleep(0.02)
    # the first half is on the wire while the pipe is still open
    sent = b"".join(pieces[:half])
    wait_for(lambda: b"".join(pcm_of(echoes_of(redis_client, "st-room-c", "cli-stream"))) == sent, 20,
             what="the first half on the wire")
    for piece in pieces[half:]:
        proc.stdin.write(piece)
    proc.stdin.close()
    proc.wait(60)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.returncode == 0, err.decode()
    assert out.decode().split()[1] in ("sent", "spoken")
    mine = echoes_of(redis_client, "st-room-c", "cli-stream")
    assert b"".join(pcm_of(mine)) == pcm + b"\0" * chunks.chunk_bytes(RATE, 40)


def test_encoded_pieces_are_decoded_as_they_arrive(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    workers.start(1)
    client.open("st-e", "loopback://st-room-e")
    pcm = voice(0.5)
    clip = tmp_path / "clip.wav"
    with wave.open(str(clip), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm)
    data = clip.read_bytes()
    with client.stream("st-e", sample_rate=RATE, format="auto", inference_id="enc-1") as s:
        for i in range(0, len(data), 3000):  # cuts that fall anywhere, header included
            s.write(data[i : i + 3000])
    assert client.wait(s.utterance_id, timeout=30)["state"] in ("sent", "spoken")
    mine = echoes_of(redis_client, "st-room-e", "enc-1")
    got = b"".join(pcm_of(mine))
    assert got[: len(pcm)] == pcm and set(got[len(pcm) :]) <= {0}
    assert [m["properties"]["done"] for m in mine] == [False] * (len(mine) - 1) + [True]
