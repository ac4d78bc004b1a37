"""Workers killed, or stopped, mid-utterance: the next owner resumes from the cursor."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.faults.conftest import PACINGS, Rig, batch_sent, loop_paced, room_url, wait_for
from tests.faults.judge import expected_chunks, judge, noise_wav, pace, sent

pytestmark = [pytest.mark.redis, pytest.mark.faults]



def _enqueue(rig: Rig, clips: int = 3, pacing: str = "capped") -> list[tuple[str, Any]]:
    rig.client.open("conv", room_url("room", pacing))
    out: list[tuple[str, Any]] = []
    for i in range(clips):
        clip = noise_wav(rig.tmp / f"c{i}.wav", 1.6, seed=20 + i)
        out.append((rig.client.play("conv", clip, utterance_id=f"a{i}"), expected_chunks(clip)))
        out.append((rig.client.say("conv", f"line {i}", utterance_id=f"t{i}"), f"line {i}"))
    return out


def _delivered(rig: Rig, expected: list[tuple[str, Any]]) -> None:
    for uid, _ in expected:
        assert rig.client.wait(uid, timeout=90)["state"] in ("sent", "spoken"), uid


@pytest.mark.parametrize(("victims", "pacing"),
                         [("owner", "capped"), ("both-then-a-fresh-worker", "capped"), ("owner", "loop"),
                          ("owner", "batched")])
def test_kill_9_mid_utterance_repeats_at_most_the_chunk_in_flight(rig: Rig, figures: dict[str, Any],
                                                                  victims: str, pacing: str) -> None:
    procs = rig.start_workers(2, **PACINGS[pacing])
    expected = _enqueue(rig, pacing=pacing)
    wait_for(lambda: len(sent(rig.client_redis, "room")) >= 15, 30, what="the first utterance to be mid-way")
    owner = rig.workers.owner("conv")
    assert owner is not None
    killed = [owner] if victims == "owner" else procs
    before = len(sent(rig.client_redis, "room"))
    for w in killed:
        w.proc.kill()
        w.proc.wait(10)
    killed_at = time.time()
    if victims != "owner":
        rig.start_workers(1, **PACINGS[pacing])
    _delivered(rig, expected)
    stream = sent(rig.client_redis, "room")
    verdict = judge(stream, expected)
    resumed = next(s.ms / 1000 for s in stream[before:] if not s.origin.startswith(tuple(w.name for w in killed)))
    assert pacing != "loop" or loop_paced(rig.workers) > 0, "the pacing loop sent none of it"
    assert pacing != "batched" or batch_sent(rig.workers) > 0, "no text went the one-script way"
    figures.update(fault=f"kill -9 of {'the owner' if victims == 'owner' else 'both workers, then one fresh worker'}"
                         f"{' (real-time pacing loop)' if pacing == 'loop' else ''}"
                         f"{' (burst, batched round trips)' if pacing == 'batched' else ''}",
                   workers=2, recovery_s=round(resumed - killed_at, 2), **verdict.figures())
    assert (verdict.lost, verdict.reordered, verdict.interleaved, verdict.reused, verdict.bad_ends) == (0, 0, 0, 0, 0), \
        verdict.problems
    assert verdict.repeated <= 1


def test_sigterm_of_the_owner_stops_at_a_message_boundary_and_the_next_owner_resumes_paced(
        rig: Rig, figures: dict[str, Any]) -> None:
    rig.start_workers(2, ECHOQ_PACING="realtime")
    expected = _enqueue(rig)
    wait_for(lambda: len(sent(rig.client_redis, "room")) >= 15, 30, what="the first utterance to be mid-way")
    owner = rig.workers.owner("conv")
    assert owner is not None
    assert owner.stop() == 0  # warm shutdown
    _delivered(rig, expected)
    stream = sent(rig.client_redis, "room")
    verdict = judge(stream, expected)
    old = {s.origin for s in stream if s.origin.startswith(owner.name)}
    handed = [s for s in stream if s.origin not in old]
    split = [iid for iid, _ in expected
             if {s.origin in old for s in stream if s.message.get("properties", {}).get("inference_id") == iid}
             == {True, False}]
    figures.update(fault="SIGTERM of the owner (real-time pacing)", workers=2, **verdict.figures(),
                   note=(f"handed over mid-utterance: {'yes' if split else 'no'}; the new owner sent "
                         f"{pace(handed):.2f} s of audio per second (1.00 is real time)"))
    assert "sender.stopped" in owner.log() or not split
    assert (verdict.lost, verdict.repeated, verdict.reordered, verdict.interleaved, verdict.reused,
            verdict.bad_ends) == (0, 0, 0, 0, 0, 0), verdict.problems
