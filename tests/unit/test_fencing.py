"""The send fence, the patience with Redis, and the pacer's clock: pure, no services."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis
from pydantic import ValidationError

from worker import sender
from worker.fencing import Fence, until_redis_answers
from worker.settings import Settings


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_fence_closes_the_margin_before_the_lease_runs_out_and_never_moves_back() -> None:
    clock = Clock(100.0)
    fence = Fence(ttl_s=10.0, margin_s=2.5, clock=clock)
    assert not fence.is_open()  # never renewed: closed
    fence.renewed(100.0)
    clock.now = 107.49
    assert fence.is_open()
    clock.now = 107.5
    assert not fence.is_open() and fence.remaining() == 0.0
    fence.renewed(99.0)  # a late answer to an older request
    assert not fence.is_open()
    fence.renewed(107.0)
    assert fence.is_open() and fence.remaining() == pytest.approx(7.0)


def test_the_margin_defaults_to_a_quarter_of_the_ttl_and_must_leave_room_for_renewals() -> None:
    assert Settings(lease_ttl_s=10).lease_margin_s == 2.5
    assert Settings(lease_ttl_s=2, scan_interval_s=0.25, lease_safety_margin_s=1.0).lease_margin_s == 1.0
    with pytest.raises(ValidationError, match="lease_safety_margin_s"):
        Settings(lease_ttl_s=10, lease_safety_margin_s=6)


def test_bookkeeping_waits_for_redis_and_gives_up_only_when_told() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise redis.ConnectionError("down")
        return "recorded"

    wake = threading.Event()
    assert until_redis_answers(flaky, what="cursor", conversation="c", wake=wake, give_up=lambda: False,
                               max_delay_s=0.01) == "recorded"
    assert len(calls) == 3

    def down() -> None:
        raise redis.ConnectionError("down")

    with pytest.raises(redis.ConnectionError):
        until_redis_answers(down, what="cursor", conversation="c", wake=wake, give_up=lambda: True, max_delay_s=0.01)


def test_real_time_pacing_starts_its_clock_again_instead_of_bursting_after_a_stall(
        monkeypatch: Any, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(50.0)
    monkeypatch.setattr(sender.time, "monotonic", clock)
    pacer = sender.Pacer(Settings(pacing="realtime"), "c7")
    pacer.start_utterance()
    assert pacer.audio_due(0.04) == pytest.approx(49.96)  # the first chunk goes at once
    assert pacer.audio_due(0.04) == pytest.approx(50.0)  # then one chunk ahead of playback
    clock.now = 60.0  # ten seconds stalled (a Redis outage, a retry loop)
    assert pacer.audio_due(0.04) == 60.0  # due now, not ten seconds ago
    assert pacer.audio_due(0.04) == pytest.approx(60.04)  # and paced from here on, not a burst
    assert pacer.late == 1
    # the room heard a gap: the log says where and how long
    (line,) = [r.getMessage() for r in caplog.records if "pacing.clock_restarted" in r.getMessage()]
    assert "conversation=c7" in line and "late_ms=9960.0" in line, line


def test_real_time_pacing_catches_up_a_short_stall_and_keeps_its_schedule(monkeypatch: Any) -> None:
    clock = Clock(50.0)
    monkeypatch.setattr(sender.time, "monotonic", clock)
    pacer = sender.Pacer(Settings(pacing="realtime"))
    pacer.start_utterance()
    assert [pacer.audio_due(0.04) for _ in range(3)] == pytest.approx([49.96, 50.0, 50.04])
    clock.now = 50.15  # 110 ms stalled: the chunks due at 50.08 and 50.12 go at once
    assert [pacer.audio_due(0.04) for _ in range(4)] == pytest.approx([50.08, 50.12, 50.16, 50.20])
    assert pacer.late == 0
    clock.now = 50.24 + sender.CATCH_UP_S + 0.01  # the next chunk (due at 50.24) stalled past what is caught up
    assert pacer.audio_due(0.04) == clock.now
    assert pacer.late == 1


def test_the_rate_cap_spaces_every_message_kind() -> None:
    pacer = sender.Pacer(Settings(max_messages_per_second=10))
    pacer.sent()
    assert pacer.message_due() == pytest.approx(pacer._last + 0.1)


class _Store:
    """Just enough of a store for a sender that waits and looks for interrupts."""

    def cursor(self, conversation_id: str) -> Any:
        from worker.store import Cursor

        return Cursor(0, 0, 0)

    def interrupt_state(self, conversation_id: str) -> tuple[int, int]:
        return 0, 0


def test_a_wake_up_is_seen_once_and_cleared_so_later_waits_still_pace() -> None:
    wake = threading.Event()
    stop = [False]
    s = sender.Sender("c", store=_Store(), transport=None, settings=Settings(), token="t",  # type: ignore[arg-type]
                      wake=wake, stopping=lambda: stop[0])
    wake.set()  # an interrupt task woke the sender, but no interrupt is pending
    s._wait_until(sender.time.monotonic() + 0.01)
    assert not wake.is_set()  # left set, every later wait would return at once: a burst
    stop[0] = True
    wake.set()
    with pytest.raises(sender.Stopping):  # a stop ends the wait at a message boundary
        s._wait_until(sender.time.monotonic() + 5)


def test_a_cursor_move_refused_for_a_lost_lease_says_so_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """A move after a send that went out another way (no append to refuse) is where a resumed
    owner may first learn its lease is gone: the log must say so, not only that it left the room."""
    from worker.store import Moved

    class Refusing(_Store):
        def move(self, *args: Any, **kwargs: Any) -> Moved:
            return Moved(held=False, gen=0, done=False)

    s = sender.Sender("c", store=Refusing(), transport=None, settings=Settings(), token="t",  # type: ignore[arg-type]
                      wake=threading.Event(), stopping=lambda: False)
    with caplog.at_level("WARNING", logger="echoq"), pytest.raises(sender.LeaseLost):
        s._advance(3, 0)
    assert [r.getMessage() for r in caplog.records if "lease.lost" in r.getMessage()], caplog.text
    assert "conversation=c" in caplog.text
