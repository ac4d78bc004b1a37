"""A worker frozen past its lease and then resumed sends nothing: the send fence."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from tests.faults.conftest import PACINGS, Rig, batch_sent, loop_paced, room_url, wait_for
from tests.faults.judge import expected_chunks, judge, noise_wav, sent
from worker import keys

pytestmark = [pytest.mark.redis, pytest.mark.faults]



def _enqueue(rig: Rig, kind: str) -> list[tuple[str, Any]]:
    if kind == "text":
        return [(rig.client.say("conv", f"line {i}", utterance_id=f"t{i}"), f"line {i}") for i in range(40)]
    out: list[tuple[str, Any]] = []
    for i in range(2):
        clip = noise_wav(rig.tmp / f"n{i}.wav", 1.6, seed=i)
        out.append((rig.client.play("conv", clip, utterance_id=f"a{i}"), expected_chunks(clip)))
        out.append((rig.client.say("conv", f"between {i}", utterance_id=f"t{i}"), f"between {i}"))
    return out


@pytest.mark.parametrize(("kind", "resume", "pacing"), [
    ("text", "while-new-owner-sends", "capped"), ("text", "after-new-owner-finished", "capped"),
    ("audio", "while-new-owner-sends", "capped"), ("audio", "after-new-owner-finished", "capped"),
    ("audio", "while-new-owner-sends", "loop"),
    ("text", "while-new-owner-sends", "batched"), ("audio", "while-new-owner-sends", "batched"),
])
def test_owner_frozen_past_its_lease_sends_nothing_when_resumed(rig: Rig, figures: dict[str, Any], kind: str,
                                                                 resume: str, pacing: str) -> None:
    rig.start_workers(2, **PACINGS[pacing])
    rig.client.open("conv", room_url("room", pacing))
    expected = _enqueue(rig, kind)
    wait_for(lambda: len(sent(rig.client_redis, "room")) >= 10, 30, what="10 messages on the wire")
    victim = rig.workers.owner("conv")
    assert victim is not None
    token = rig.client_redis.get(keys.lease("conv"))
    assert token is not None
    victim.proc.send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    frozen_after = len(sent(rig.client_redis, "room"))
    resumed_after = frozen_after
    try:
        def new_owner_sent() -> bool:
            return any(s.origin not in ("", token.decode()) for s in sent(rig.client_redis, "room")[frozen_after:])

        wait_for(new_owner_sent, 30, what="another worker to adopt the conversation and send")
        recovered_s = time.monotonic() - frozen_at
        if resume == "after-new-owner-finished":
            for uid, _ in expected:
                assert rig.client.wait(uid, timeout=60)["state"] in ("sent", "spoken")
        else:  # the new owner is mid-way: the last utterance is not in the room yet
            assert rig.client.status(expected[-1][0])["state"] in ("queued", "sending")
    finally:
        # what the victim sent from here on, it sent once resumed. Counted from SIGSTOP instead,
        # a write it had sent just before the stop took effect (kill() does not wait for that;
        # on a busy machine it can land after the count) would be taken for one.
        resumed_after = len(sent(rig.client_redis, "room"))
        victim.proc.send_signal(signal.SIGCONT)
    # the resumed worker finds its lease gone and leaves the room; it keeps running
    wait_for(lambda: "room.left" in victim.log(), 30, what="the resumed worker to let the conversation go")
    for uid, _ in expected:
        assert rig.client.wait(uid, timeout=60)["state"] in ("sent", "spoken")
    assert victim.proc.poll() is None

    stream = sent(rig.client_redis, "room")
    from_resumed = [s for s in stream[resumed_after:] if s.origin == token.decode()]
    verdict = judge(stream, expected)
    assert pacing != "loop" or loop_paced(rig.workers) > 0, "the pacing loop sent none of it"
    assert pacing != "batched" or batch_sent(rig.workers) > 0, "no text went the one-script way"
    mode = {"loop": " (real-time pacing loop)", "batched": " (burst, batched round trips)"}.get(pacing, "")
    figures.update(fault=f"SIGSTOP of the owner past its lease ({kind}), SIGCONT {resume.replace('-', ' ')}{mode}",
                   workers=2, from_resumed=len(from_resumed), recovery_s=round(recovered_s, 2), **verdict.figures())
    assert from_resumed == [], f"the resumed worker sent {len(from_resumed)} message(s)"
    assert (verdict.lost, verdict.reordered, verdict.interleaved, verdict.reused, verdict.bad_ends) == (0, 0, 0, 0, 0), \
        verdict.problems
    assert verdict.repeated <= 1  # the message in flight at the freeze, resent by the new owner
    assert "send.fenced" in victim.log() or "lease.lost" in victim.log()
