"""Redis restarts and stalls: workers stay up, wait it out, and resume every conversation."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.faults.conftest import PACINGS, Rig, loop_paced, room_url, wait_for
from tests.faults.judge import Verdict, expected_chunks, judge, noise_wav, sent
from worker.errors import BackendUnavailable

pytestmark = [pytest.mark.redis, pytest.mark.faults]

ROOMS = ("r0", "r1")


def _enqueue(rig: Rig, pacing: str = "capped") -> dict[str, list[tuple[str, Any]]]:
    """Two conversations, each with audio and text, paced so the fault lands mid-utterance."""
    out: dict[str, list[tuple[str, Any]]] = {}
    for n, room in enumerate(ROOMS):
        rig.client.open(f"conv-{room}", room_url(room, pacing))
        items: list[tuple[str, Any]] = []
        for i in range(2):
            clip = noise_wav(rig.tmp / f"{room}-{i}.wav", 1.6, seed=10 * n + i)
            items.append((rig.client.play(f"conv-{room}", clip, utterance_id=f"{room}-a{i}"), expected_chunks(clip)))
            items.append((rig.client.say(f"conv-{room}", f"{room} line {i}", utterance_id=f"{room}-t{i}"), f"{room} line {i}"))
        out[room] = items
    return out


def _all_delivered(rig: Rig, expected: dict[str, list[tuple[str, Any]]]) -> None:
    for items in expected.values():
        for uid, _ in items:
            assert rig.client.wait(uid, timeout=25)["state"] in ("sent", "spoken"), uid


def _resumed_after(rig: Rig, since: float) -> float:
    """Seconds from ``since`` (wall clock, Redis back) until the first message Redis took after it."""
    firsts = [s.ms / 1000 for room in ROOMS for s in sent(rig.client_redis, room) if s.ms / 1000 >= since]
    return round(min(firsts) - since, 2) if firsts else float("nan")


def _cli_say(rig: Rig, text: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "ECHOQ_REDIS_URL": rig.redis.url}
    return subprocess.run([sys.executable, "-m", "producer.cli", "say", "conv-r0", text, *args], env=env,
                          capture_output=True, timeout=60)


def _verdict(rig: Rig, expected: dict[str, list[tuple[str, Any]]]) -> Verdict:
    total = Verdict()
    for room, items in expected.items():
        total.add(judge(sent(rig.client_redis, room), items))
    return total


def _dead_logs(procs: list[Any]) -> str:
    """The exit status and the last lines of each worker that exited: why it died."""
    return "\n".join(f"{p.name} exited {p.proc.returncode}:\n{p.log()[-3000:]}" for p in procs if p.proc.poll() is not None)


@pytest.mark.parametrize(("outage_s", "workers", "pacing"),
                         [(3, 1, "capped"), (3, 2, "capped"), (12, 2, "capped"), (3, 2, "loop"), (3, 2, "batched")])
def test_redis_shutdown_and_restart_workers_stay_up_and_resume(rig: Rig, figures: dict[str, Any], outage_s: int,
                                                               workers: int, pacing: str) -> None:
    procs = rig.start_workers(workers, **PACINGS[pacing])
    expected = _enqueue(rig, pacing)
    wait_for(lambda: all(len(sent(rig.client_redis, r)) >= 8 for r in ROOMS), 30, what="both rooms to be mid-way")
    rig.redis.shutdown()  # SHUTDOWN: the AOF is written, then Redis exits
    down_at = time.monotonic()
    with pytest.raises(BackendUnavailable, match="unreachable"):
        rig.client.say("conv-r0", "while Redis is down")
    if workers == 1:  # the command line says so too, with its own exit status
        assert _cli_say(rig, "while Redis is down").returncode == 5
    time.sleep(max(0.0, outage_s - (time.monotonic() - down_at)))  # the injected fault: an outage this long
    rig.redis.start()
    outage = time.monotonic() - down_at
    back_at = time.time()
    assert all(p.proc.poll() is None for p in procs), f"a worker died while Redis was down:\n{_dead_logs(procs)}"
    late = rig.client.say("conv-r0", "after the restart", utterance_id="late")
    expected["r0"].append((late, "after the restart"))
    if workers == 1:
        assert _cli_say(rig, "from the command line", "--id", "cli").returncode == 0
        expected["r0"].append(("cli", "from the command line"))
    _all_delivered(rig, expected)
    assert all(p.proc.poll() is None for p in procs), f"a worker died after Redis came back:\n{_dead_logs(procs)}"

    verdict = _verdict(rig, expected)
    assert pacing != "loop" or loop_paced(rig.workers) > 0, "the pacing loop sent none of it"
    mode = {"loop": " (real-time pacing loop)", "batched": " (burst, batched round trips)"}.get(pacing, "")
    figures.update(fault=f"Redis SHUTDOWN (AOF everysec), restarted after {outage_s} s{mode}",
                   workers=workers,
                   outage_s=round(outage, 1), note="workers stayed up; producers got BackendUnavailable meanwhile",
                   resumed_after_s=_resumed_after(rig, back_at),
                   **verdict.figures())
    assert (verdict.lost, verdict.repeated, verdict.reordered, verdict.interleaved, verdict.reused,
            verdict.bad_ends) == (0, 0, 0, 0, 0, 0), verdict.problems


@pytest.mark.parametrize("pacing", ["capped", "loop"])
def test_redis_frozen_for_ten_seconds_loses_nothing(rig: Rig, figures: dict[str, Any], pacing: str) -> None:
    procs = rig.start_workers(2, **PACINGS[pacing])
    expected = _enqueue(rig)
    wait_for(lambda: all(len(sent(rig.client_redis, r)) >= 8 for r in ROOMS), 30, what="both rooms to be mid-way")
    rig.redis.freeze()
    try:
        time.sleep(10)  # the injected fault: Redis stalled (SIGSTOP) for 10 s
    finally:
        rig.redis.thaw()
    back_at = time.time()
    _all_delivered(rig, expected)
    assert all(p.proc.poll() is None for p in procs)
    verdict = _verdict(rig, expected)
    assert pacing != "loop" or loop_paced(rig.workers) > 0, "the pacing loop sent none of it"
    figures.update(fault=f"Redis frozen (SIGSTOP) for 10 s{' (real-time pacing loop)' if pacing == 'loop' else ''}", workers=2,
                   resumed_after_s=_resumed_after(rig, back_at), **verdict.figures())
    assert (verdict.lost, verdict.reordered, verdict.interleaved, verdict.reused, verdict.bad_ends) == (0, 0, 0, 0, 0), \
        verdict.problems
    assert verdict.repeated <= 1
