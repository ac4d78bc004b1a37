"""A worker that cannot keep up lets a conversation go, visibly, and nothing is lost or repeated:
real worker processes, loopback rooms slower than real time, the replica simulator."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from tests.faults.judge import expected_chunks, judge, noise_wav, sent
from tests.integration.conftest import Workers, wait_for
from worker import capacity

pytestmark = pytest.mark.redis

#: real-time pacing; a conversation is behind after 3 clock restarts in a lease TTL (2 s here)
SHEDS = {"ECHOQ_PACING": "realtime", "ECHOQ_SHED_LATE_CHUNKS": "3", "ECHOQ_SHED_COOLDOWN_S": "4"}
#: a room that takes 80 ms per 40 ms chunk: its sender cannot keep up with real time
SLOW = "send_delay=0.08"


def event_types(client: Any, cid: str) -> list[str]:
    return [e["type"] for _id, e in client.events(cid, count=1000)]


def clean(verdict: Any) -> tuple[int, ...]:
    return (verdict.lost, verdict.repeated, verdict.reordered, verdict.interleaved, verdict.reused, verdict.bad_ends)


@pytest.mark.parametrize("elsewhere", [True, False], ids=["another-worker-takes-it", "it-waits-visibly"])
def test_a_worker_falling_behind_real_time_sheds_its_newest_conversation_and_every_line_is_spoken_once_in_order(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, tmp_path: Any, elsewhere: bool
) -> None:
    (busy,) = workers.start(1, **SHEDS)
    for cid, url in (("slow-1", f"loopback://shed-slow-1?{SLOW}"), ("slow-2", f"loopback://shed-slow-2?{SLOW}"),
                     ("calm", "loopback://shed-calm")):  # opened one after the other: calm is the newest
        client.open(cid, url)
        wait_for(lambda cid=cid: client.conversation(cid)["owner"] == busy.name, 30, what=f"{cid} to be taken")
    lines = [(client.say("calm", f"calm {n}", utterance_id=f"calm-{n}"), f"calm {n}") for n in range(3)]
    for uid, _ in lines:
        client.wait(uid, timeout=30, states=("sent", "spoken"))
    other = workers.start(1, ECHOQ_PACING="realtime", ECHOQ_SHED_LATE_CHUNKS="0")[0] if elsewhere else None

    clips: dict[str, list[tuple[str, Any]]] = {"slow-1": [], "slow-2": []}
    for n in range(2):
        for cid in clips:
            clip = noise_wav(tmp_path / f"{cid}-{n}.wav", 1.6, seed=40 + n + 10 * len(cid))
            clips[cid].append((client.play(cid, clip, utterance_id=f"{cid}-a{n}"), expected_chunks(clip)))

    # the two slow rooms put the worker behind real time: it lets its newest conversation go
    wait_for(lambda: "conversation.shed" in event_types(client, "calm"), 60, what="calm to be shed")
    (shed,) = [e for _id, e in client.events("calm", count=1000) if e["type"] == "conversation.shed"]
    assert shed["worker"] == busy.name and "behind" in shed["reason"]
    lines += [(client.say("calm", f"calm {n}", utterance_id=f"calm-{n}"), f"calm {n}") for n in range(3, 6)]
    for uid, _ in lines:
        assert client.wait(uid, timeout=90, states=("sent", "spoken"))["state"] in ("sent", "spoken"), uid
    for expected in clips.values():
        for uid, _ in expected:
            assert client.wait(uid, timeout=120, states=("sent", "spoken"))["state"] in ("sent", "spoken"), uid

    # every line once, in order; those said after the shed came from the worker that took it
    stream = sent(redis_client, "shed-calm")
    assert [s.message["properties"]["text"] for s in stream] == [text for _uid, text in lines]
    assert clean(judge(stream, [(client.status(uid)["inference_id"], text) for uid, text in lines])) == (0,) * 6
    types = event_types(client, "calm")
    after = types[types.index("conversation.shed"):]
    assert "conversation.joined" in after
    if other is not None:
        assert {s.origin.split(":")[0] for s in stream[3:]} == {other.name}
        assert client.conversation("calm")["owner"] == other.name
    else:  # nobody had room: it waited, said so, and came back to the worker once it could keep up
        assert after.index("conversation.waiting") < after.index("conversation.joined")
        shown = [e for _id, e in client.events("calm", count=1000) if e["type"] == "conversation.waiting"]
        assert shown[-1]["reason"] == capacity.REASON_FULL
        assert {s.origin.split(":")[0] for s in stream} == {busy.name}
    # the slow rooms: every chunk once, in order, whoever sent it
    for cid, expected in clips.items():
        room = f"shed-{cid}"
        verdict = judge(sent(redis_client, room),
                        [(client.status(uid)["inference_id"], chunks) for uid, chunks in expected])
        assert clean(verdict) == (0,) * 6, (room, verdict.problems)
