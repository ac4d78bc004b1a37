"""Real-time pacing on one loop per worker: more rooms than threads play at once, each in order,
each chunk once, and the next utterance decodes while the one before it plays."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.faults.judge import expected_chunks, judge, noise_wav, sent
from tests.integration.conftest import Workers, heard_everything, wait_for
from worker import capacity

pytestmark = pytest.mark.redis

ROOMS = 10  # a worker started with -c 6 would pace 6 - 2 = 4 of them on threads


def test_one_worker_paces_more_rooms_than_it_has_threads_at_once_each_in_order_and_once(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    assert ROOMS > 6 - capacity.CONTROL_THREADS
    cids = [f"pl-{i}" for i in range(ROOMS)]
    expected: dict[str, list[tuple[str, Any]]] = {}
    # everything queued before the worker starts: the rooms start together, not as fast as
    # this test can enqueue
    for i, cid in enumerate(cids):
        client.open(cid, f"loopback://pl-room-{cid}")
        first = noise_wav(tmp_path / f"a{i}.wav", 6.0, seed=i)
        second = noise_wav(tmp_path / f"b{i}.wav", 0.8, seed=100 + i)
        expected[cid] = [(client.play(cid, first, utterance_id=f"{cid}-a"), expected_chunks(first)),
                         (client.play(cid, second, utterance_id=f"{cid}-b"), expected_chunks(second))]
    (worker,) = workers.start(1, ECHOQ_PACING="realtime")  # -c 6
    wait_for(lambda: all(client.conversation(c)["owner"] == worker.name for c in cids), 30,
             what=f"one worker to take all {ROOMS} conversations")
    for items in expected.values():
        for uid, _ in items:
            assert client.wait(uid, timeout=90)["state"] in ("sent", "spoken"), uid

    streams = {cid: sent(redis_client, f"pl-room-{cid}") for cid in cids}
    for cid, items in expected.items():
        verdict = judge(streams[cid], items)
        assert (verdict.lost, verdict.repeated, verdict.reordered, verdict.interleaved, verdict.reused,
                verdict.bad_ends) == (0, 0, 0, 0, 0, 0), (cid, verdict.problems)
        assert heard_everything(simulator, redis_client, f"pl-room-{cid}")["violations"] == []

    # all at once, not in turns: every room's first chunk went out before any room's first clip
    # ended (on threads, six of the ten would have waited for one of the four to finish)
    first_ids = [stream[0].entry_id for stream in streams.values()]
    first_clip_ends = [next(s.entry_id for s in stream if s.message["properties"].get("done"))
                       for stream in streams.values()]
    assert max(map(_stream_order, first_ids)) < min(map(_stream_order, first_clip_ends))

    log = worker.log()
    assert log.count("pacing.took") == 2 * ROOMS
    for cid in cids:
        # the second clip was decoding before the first one was all in the room
        ahead = re.search(rf"utterance\.decoding_ahead conversation={cid} utterance={cid}-b\b", log)
        done = re.search(rf"utterance\.sent conversation={cid} utterance={cid}-a\b", log)
        assert ahead and done and ahead.start() < done.start(), cid


def _stream_order(entry_id: str) -> tuple[int, int]:
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n)


def test_a_stop_mid_clip_hands_the_rest_to_the_next_owner_with_no_chunk_twice(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    first, second = workers.start(2, ECHOQ_PACING="realtime")
    client.open("pl-stop", "loopback://pl-stop-room")
    wait_for(lambda: client.conversation("pl-stop")["owner"], 30, what="an owner")
    clip = noise_wav(tmp_path / "long.wav", 4.0, seed=7)
    uid = client.play("pl-stop", clip, utterance_id="pl-stop-clip")
    wait_for(lambda: len(sent(redis_client, "pl-stop-room")) >= 20, 30, what="the clip to be mid-way")
    owner = workers.owner("pl-stop")
    assert owner is not None
    assert owner.stop() == 0  # warm shutdown: the loop stops the clip at a chunk boundary
    assert client.wait(uid, timeout=60)["state"] in ("sent", "spoken")
    stream = sent(redis_client, "pl-stop-room")
    verdict = judge(stream, [(uid, expected_chunks(clip))])
    assert (verdict.lost, verdict.repeated, verdict.reordered, verdict.bad_ends) == (0, 0, 0, 0), verdict.problems
    origins = [s.origin.split(":")[0] for s in stream]
    other = second if owner is first else first
    assert origins[0] == owner.name and origins[-1] == other.name  # handed over mid-clip, then finished
    assert "pacing.took" in owner.log() and "resume_chunk=" in other.log()
