"""The session limit rule: senders that pace on a thread each keep one, control tasks keep two."""

from __future__ import annotations

from worker import capacity
from worker.settings import Settings


def test_burst_pacing_is_limited_by_max_sessions_alone() -> None:
    s = Settings(pacing="burst", max_sessions=50)
    assert capacity.session_limit(s, threads=8) == 50
    assert not capacity.paces_in_real_time(s, "echo") and not capacity.holds_a_thread(s, "echo")
    assert capacity.paces_in_real_time(s, "microphone")  # microphone audio is always real time
    assert capacity.holds_a_thread(s, "microphone")


def test_realtime_pacing_with_the_pacing_loop_holds_no_thread_per_echo_conversation() -> None:
    s = Settings(pacing="realtime", max_sessions=50)
    assert capacity.session_limit(s, threads=8) == 50
    assert capacity.paces_in_real_time(s, "echo") and not capacity.holds_a_thread(s, "echo")
    assert capacity.holds_a_thread(s, "microphone")  # the microphone writer keeps its thread


def test_realtime_pacing_on_threads_leaves_two_threads_for_control_tasks() -> None:
    s = Settings(pacing="realtime", pacing_loop=False, max_sessions=50)
    assert capacity.session_limit(s, threads=8) == 6
    assert capacity.holds_a_thread(s, "echo")
    assert capacity.session_limit(Settings(pacing="realtime", pacing_loop=False, max_sessions=3), threads=8) == 3
    assert capacity.session_limit(s, threads=1) == 1  # a one-thread worker still serves one


def test_the_fleet_counts_live_workers_only() -> None:
    import json
    import time

    class Heartbeats:
        def __init__(self, beats: dict[bytes, bytes]) -> None:
            self.beats = beats

        def hgetall(self, _key: str) -> dict[bytes, bytes]:
            return self.beats

    now = time.time()
    beat = {b"a": json.dumps({"sessions": ["x", "y"], "max_sessions": 2, "ts": now}).encode(),
            b"old": json.dumps({"sessions": [], "max_sessions": 50, "ts": now - 600}).encode(),
            b"leaving": json.dumps({"sessions": [], "max_sessions": 50, "ts": now,
                                    "shutting_down": True}).encode()}
    full = capacity.fleet(Heartbeats(beat), Settings(), now=now)  # type: ignore[arg-type]
    assert (full.workers, full.free, full.waiting_reason) == (1, 0, capacity.REASON_FULL)
    none = capacity.fleet(Heartbeats({}), Settings(), now=now)  # type: ignore[arg-type]
    assert none.waiting_reason == capacity.REASON_NO_WORKER
