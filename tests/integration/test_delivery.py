"""End to end on loopback rooms: real Redis, real worker processes, the replica simulator."""

from __future__ import annotations

import base64
import json
import threading
import time
import wave
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from tests.integration.conftest import Workers, wait_for, wire
from worker import audio, chunks, keys
from worker.settings import get_settings

pytestmark = pytest.mark.redis


def tone_wav(path: Path, seconds: float, freq: float = 440.0, rate: int = 44100, channels: int = 2) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.4 * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2")
    frames = np.repeat(samples[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames.tobytes())
    return path


def expected_chunks(path: Path, rate: int = 24000) -> list[bytes]:
    s = get_settings()
    pcm = audio.convert(path.read_bytes(), target_rate=rate, max_bytes=s.max_audio_bytes, max_seconds=s.max_audio_seconds)
    return list(chunks.rechunk([pcm], chunks.chunk_bytes(rate, s.chunk_ms)))


def by_utterance(messages: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for m in messages:
        if m["event_type"] == "conversation.echo":
            out[m["properties"]["inference_id"]].append(m)
    return out


def utterance_order(messages: list[dict[str, Any]]) -> list[str]:
    """inference ids in the order their first message went on the wire."""
    seen: list[str] = []
    for m in messages:
        if m["event_type"] == "conversation.echo" and m["properties"]["inference_id"] not in seen:
            seen.append(m["properties"]["inference_id"])
    return seen


def assert_not_interleaved(messages: list[dict[str, Any]]) -> None:
    current, finished = None, set()
    for m in messages:
        if m["event_type"] != "conversation.echo":
            current = None
            continue
        inf = m["properties"]["inference_id"]
        assert inf not in finished, f"{inf} sent again after it was done"
        assert current in (None, inf), f"{inf} started while {current} was unfinished"
        current = inf
        if m["properties"]["done"] is True:
            finished.add(inf)
            current = None


def pcm_of(msgs: list[dict[str, Any]]) -> list[bytes]:
    return [base64.b64decode(m["properties"]["audio"]) for m in msgs]


def test_text_and_audio_reach_the_simulator_valid_complete_and_in_order(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    workers.start(1)
    client.open("conv-a", "loopback://room-a")
    clip = tone_wav(tmp_path / "clip.wav", 1.0, freq=700)
    ids = [client.say("conv-a", "Hello there!"), client.play("conv-a", clip), client.say("conv-a", "Goodbye.")]
    for uid in ids:
        rec = client.wait(uid, timeout=30)
        assert rec["state"] in ("sent", "spoken"), rec

    messages = wire(redis_client, "room-a")
    assert utterance_order(messages) == ids
    groups = by_utterance(messages)
    assert groups[ids[0]][0]["properties"] == {"modality": "text", "text": "Hello there!", "inference_id": ids[0], "done": True}
    audio_msgs = groups[ids[1]]
    assert [m["properties"]["done"] for m in audio_msgs] == [False] * (len(audio_msgs) - 1) + [True]
    assert {m["properties"]["sample_rate"] for m in audio_msgs} == {24000}
    assert pcm_of(audio_msgs) == expected_chunks(clip)

    # the simulator validated everything, reassembled the WAV, and reported the replica speaking
    wait_for(lambda: client.status(ids[2])["state"] == "spoken", 20, what="the replica to finish speaking")
    report = simulator.report()["rooms"]["room-a"]
    assert report["violations"] == []
    wav_path = Path(next(u["wav"] for u in report["utterances"] if u["inference_id"] == ids[1]))
    with wave.open(str(wav_path)) as w:
        assert (w.getframerate(), w.getnchannels()) == (24000, 1)
        assert w.readframes(w.getnframes()) == b"".join(expected_chunks(clip))
    assert client.status(ids[1])["state"] == "spoken"


def test_many_conversations_from_many_threads_on_two_workers_keep_order_exactly_once(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    workers.start(2)
    clip = tone_wav(tmp_path / "short.wav", 0.2, freq=500)
    n_conv, n_utt = 20, 10
    for c in range(n_conv):
        client.open(f"conv-{c}", f"loopback://room-{c}")
    errors: list[BaseException] = []

    def produce(offset: int) -> None:
        try:
            for u in range(n_utt):
                for c in range(offset, n_conv, 4):
                    if u % 3 == 1:
                        client.play(f"conv-{c}", clip, utterance_id=f"c{c}-u{u}")
                    else:
                        client.say(f"conv-{c}", f"line {u}", utterance_id=f"c{c}-u{u}")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for c in range(n_conv):
        for u in range(n_utt):
            assert client.wait(f"c{c}-u{u}", timeout=60)["state"] in ("sent", "spoken")

    # Which worker wins each conversation depends on timing; that each has one owner does not.
    owners = [workers.owner(f"conv-{c}") for c in range(n_conv)]
    assert all(owner is not None for owner in owners), "every conversation has an owner"
    clip_chunks = expected_chunks(clip)
    for c in range(n_conv):
        messages = wire(redis_client, f"room-{c}")
        assert utterance_order(messages) == [f"c{c}-u{u}" for u in range(n_utt)]
        assert_not_interleaved(messages)
        groups = by_utterance(messages)
        for u in range(n_utt):
            if u % 3 == 1:
                assert pcm_of(groups[f"c{c}-u{u}"]) == clip_chunks  # every chunk exactly once
            else:
                assert len(groups[f"c{c}-u{u}"]) == 1


def _slow_audio_env() -> dict[str, str]:
    # 25 messages a second: a 4 s clip (100 chunks) takes about 4 s to send, long enough to kill mid-way
    return {"ECHOQ_MAX_MESSAGES_PER_SECOND": "25"}


def test_kill_9_of_the_owner_mid_utterance_another_worker_resumes_under_the_same_inference_id(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    workers.start(2, **_slow_audio_env())
    client.open("conv-k", "loopback://room-k")
    clip = tone_wav(tmp_path / "long.wav", 4.0, freq=300)
    first = client.play("conv-k", clip, utterance_id="long")
    later = [client.say("conv-k", f"after {i}", utterance_id=f"after-{i}") for i in range(3)]
    wait_for(lambda: len(wire(redis_client, "room-k")) >= 30, 30, what="30 chunks on the wire")
    victim = workers.owner("conv-k")
    assert victim is not None
    victim.proc.kill()  # SIGKILL: no shutdown code runs
    victim.proc.wait(10)

    assert client.wait(first, timeout=60)["state"] in ("sent", "spoken")
    for uid in later:
        assert client.wait(uid, timeout=30)["state"] in ("sent", "spoken")
    assert workers.owner("conv-k") is not victim

    messages = wire(redis_client, "room-k")
    assert utterance_order(messages) == [first, *later]
    got = pcm_of(by_utterance(messages)[first])
    want = expected_chunks(clip)
    # no chunk lost, at most one repeated (the one in flight when the owner died)
    assert len(got) - len(want) in (0, 1)
    if len(got) == len(want) + 1:
        dup = next(i for i in range(len(want)) if got[i] != want[i]) if got[: len(want)] != want else len(want)
        assert got[dup] == got[dup - 1]
        got = got[:dup] + got[dup + 1 :]
    assert got == want
    dones = [m["properties"]["done"] for m in by_utterance(messages)[first]]
    assert dones.count(True) == 1 and dones[-1] is True


def test_sigterm_of_the_owner_hands_over_with_nothing_lost_or_repeated(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    workers.start(2, **_slow_audio_env())
    client.open("conv-t", "loopback://room-t")
    clip = tone_wav(tmp_path / "mid.wav", 2.0, freq=350)
    ids = [client.play("conv-t", clip, utterance_id=f"t{i}") for i in range(3)]
    wait_for(lambda: len(wire(redis_client, "room-t")) >= 10, 30, what="the first chunks")
    owner = workers.owner("conv-t")
    assert owner is not None
    assert owner.stop(timeout=60) == 0  # warm shutdown: finishes the utterance in flight, hands back

    for uid in ids:
        assert client.wait(uid, timeout=60)["state"] in ("sent", "spoken")
    messages = wire(redis_client, "room-t")
    assert utterance_order(messages) == ids
    assert_not_interleaved(messages)
    want = expected_chunks(clip)
    for uid in ids:
        assert pcm_of(by_utterance(messages)[uid]) == want
    assert "room.left" in owner.log()


def test_injected_send_failures_and_disconnects_still_deliver_everything_once_in_order(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    workers.start(1)
    client.open("conv-f", "loopback://room-f?fail_rate=0.2&seed=7")
    client.open("conv-d", "loopback://room-d?disconnect_after=7")
    clip = tone_wav(tmp_path / "f.wav", 0.6, freq=900)
    ids: dict[str, list[str]] = {"conv-f": [], "conv-d": []}
    for i in range(12):
        for conv in ids:
            ids[conv].append(client.play(conv, clip) if i % 2 else client.say(conv, f"line {i}"))
    for uids in ids.values():
        for uid in uids:
            assert client.wait(uid, timeout=60)["state"] in ("sent", "spoken")
    want = expected_chunks(clip)
    for conv, room in (("conv-f", "room-f"), ("conv-d", "room-d")):
        messages = wire(redis_client, room)
        assert utterance_order(messages) == ids[conv]
        assert_not_interleaved(messages)
        groups = by_utterance(messages)
        for i, uid in enumerate(ids[conv]):
            assert (pcm_of(groups[uid]) == want) if i % 2 else len(groups[uid]) == 1
    log = workers.started[0].log()
    assert "send.retry" in log and "SendFailed" in log and "RoomDisconnected" in log and "rejoined" in log


@pytest.mark.parametrize("pacing", ["capped", "loop"])
def test_interrupt_with_a_hundred_queued_stops_at_once_and_the_next_utterance_is_fresh(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, tmp_path: Path, pacing: str
) -> None:
    (worker,) = workers.start(1, **(_slow_audio_env() if pacing == "capped" else {"ECHOQ_PACING": "realtime"}))
    client.open("conv-i", "loopback://room-i")
    clip = tone_wav(tmp_path / "i.wav", 2.0, freq=400)
    queued = [client.play("conv-i", clip)] + [client.say("conv-i", f"queued {i}") for i in range(99)]
    wait_for(lambda: len(wire(redis_client, "room-i")) >= 5, 30, what="the first utterance to start")
    cancelled = client.interrupt("conv-i")
    assert cancelled == 99

    def interrupt_index() -> int | None:
        msgs = wire(redis_client, "room-i")
        return next((i for i, m in enumerate(msgs) if m["event_type"] == "conversation.interrupt"), None)

    idx = wait_for(interrupt_index, 10, what="conversation.interrupt on the wire")
    # the sender notices within one message: at most the chunk in flight goes out after the
    # interrupt was recorded. "After" is read off Redis's own clock (the stream ids of the
    # interrupt's event and of the room's messages), not off when this process got to look.
    (requested,) = [int(sid.split(b"-")[0]) for sid, f in redis_client.xrange(keys.conv_events("conv-i"))
                    if json.loads(f[b"data"])["type"] == "interrupt.requested"]
    room_ms = [int(sid.split(b"-")[0]) for sid, _ in redis_client.xrange(keys.loopback_room("room-i"))]
    assert len([ms for ms in room_ms[:idx] if ms < requested]) >= 4  # the ones waited for above
    assert len([ms for ms in room_ms[:idx] if ms >= requested]) <= 2
    fresh = client.say("conv-i", "A fresh start.")
    assert client.wait(fresh, timeout=20)["state"] in ("sent", "spoken")

    messages = wire(redis_client, "room-i")
    after = messages[idx + 1 :]
    assert [m["properties"]["inference_id"] for m in after] == [fresh]
    assert fresh not in queued
    assert not any(m["properties"]["done"] for m in messages[:idx] if m["properties"]["inference_id"] == queued[0])
    assert client.status(queued[0])["state"] == "interrupted"
    assert {client.status(u)["state"] for u in queued[1:]} == {"cancelled"}
    if pacing == "loop":  # the clip was the pacing loop's until the interrupt cut it
        assert f"pacing.took conversation=conv-i utterance={queued[0]}" in worker.log()
        assert f"utterance.sent conversation=conv-i utterance={queued[0]}" not in worker.log()


def test_bad_input_is_refused_with_a_clear_error_and_the_next_utterance_still_plays(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    from worker.errors import AudioError, InvalidInput, TextTooLong, UnknownConversation
    from worker.store import Store

    workers.start(1)
    client.open("conv-b", "loopback://room-b")
    garbage = tmp_path / "not-audio.mp3"
    garbage.write_bytes(b"this is not audio at all" * 100)
    cases = [
        (lambda: client.say("nope", "hi"), UnknownConversation, "no conversation 'nope'"),
        (lambda: client.say("conv-b", "   "), InvalidInput, "text is empty"),
        (lambda: client.say("conv-b", "x" * 5000), TextTooLong, "too long"),
        (lambda: client.play("conv-b", garbage), AudioError, "."),
        (lambda: client.play("conv-b", tmp_path / "missing.wav"), AudioError, "no such audio file"),
        (lambda: client.play("conv-b", garbage, sample_rate=44100), InvalidInput, "16000 or 24000"),
    ]
    for call, exc_type, text in cases:
        with pytest.raises(exc_type, match=text):
            call()
    assert redis_client.llen(keys.conv_log("conv-b")) == 0  # nothing enqueued

    # audio that fails only when the worker decodes it fails that utterance, and only that one
    store = Store(redis_client)
    store.enqueue("conv-b", {"utterance_id": "broken", "kind": "audio", "inference_id": "broken", "sample_rate": 24000},
                  {"id": "broken", "conversation_id": "conv-b", "inference_id": "broken", "kind": "audio"},
                  blob=b"\x00garbage" * 50)
    good = client.say("conv-b", "Still here.")
    rec = client.wait("broken", timeout=20)
    assert rec["state"] == "failed" and rec["error"]
    assert client.wait(good, timeout=20)["state"] in ("sent", "spoken")
    assert [m["properties"]["inference_id"] for m in wire(redis_client, "room-b")] == [good]


def test_close_sends_what_is_queued_then_leaves_and_refuses_more(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis
) -> None:
    from worker.errors import UnknownConversation

    workers.start(1)
    client.open("conv-c", "loopback://room-c")
    ids = [client.say("conv-c", f"line {i}") for i in range(5)]
    client.close("conv-c")
    with pytest.raises(UnknownConversation, match="closing|closed"):
        client.say("conv-c", "too late")
    for uid in ids:
        assert client.wait(uid, timeout=20)["state"] in ("sent", "spoken")
    wait_for(lambda: client.conversation("conv-c")["state"] == "closed" and redis_client.get(keys.lease("conv-c")) is None,
             20, what="the conversation to close and its worker to let go")
    assert utterance_order(wire(redis_client, "room-c")) == ids
    time.sleep(1.0)  # several supervisor scans (0.25 s): none may take the closed conversation back
    assert redis_client.get(keys.lease("conv-c")) is None
    beat = json.loads(redis_client.hget(keys.WORKERS, workers.started[0].name))
    assert "conv-c" not in beat["sessions"]
    assert "room.left" in workers.started[0].log()


def test_a_room_that_never_gets_a_replica_reports_why_and_delivers_once_it_does(
    workers: Workers, client: Any, redis_client: redis.Redis
) -> None:
    workers.start(1, ECHOQ_REPLICA_WAIT_TIMEOUT_S="0.5")
    client.open("conv-r", "loopback://room-r")  # no simulator is running: no replica in the room
    uid = client.say("conv-r", "Anyone there?")
    wait_for(lambda: "replica" in client.conversation("conv-r").get("last_error", ""), 20,
             what="the conversation to say the replica is missing")
    assert client.status(uid)["state"] == "queued" and wire(redis_client, "room-r") == []
    redis_client.set(keys.SIMULATOR_ALIVE, "1", px=60000)  # the replica arrives
    assert client.wait(uid, timeout=20)["state"] == "sent"
    assert [m["properties"]["text"] for m in wire(redis_client, "room-r")] == ["Anyone there?"]
