"""The pacing loop's shared send grid: each utterance's chunks keep one offset from their due
times, and the chunks of different rooms due within one tick go in one round trip."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from worker.pacing import Handed, Owner, PacingLoop, PreparedChunk, on_grid, tick_for
from worker.readahead import ReadAhead
from worker.store import MoveCall, Moved

CHUNK_S = 0.04
CHUNKS = 10


@pytest.mark.parametrize(("chunk_ms", "tick_ms"), [(40, 10), (50, 10), (30, 10), (25, 5), (45, 5), (13, 1), (1000, 10)])
def test_the_tick_divides_the_chunk_interval(chunk_ms: int, tick_ms: int) -> None:
    assert tick_for(chunk_ms) == tick_ms / 1000


def test_every_chunk_of_an_utterance_sits_the_same_distance_ahead_of_its_due_time() -> None:
    dice = random.Random(5)
    for _ in range(200):
        t0 = dice.uniform(0, 100_000)  # a monotonic clock's reading
        audio_s, offsets = 0.0, set()
        for _k in range(3000):  # two minutes of 40 ms chunks, due times summed as the pacer sums them
            due = t0 + audio_s - CHUNK_S
            sent = on_grid(due, 0.01)
            assert due - 0.01 < sent <= due + 1e-9
            offsets.add(round(due - sent, 6))
            audio_s += 1920 / (2 * 24000)
        assert len(offsets) == 1, (t0, offsets)
    assert on_grid(12.3456, 0.0) == 12.3456  # no grid


class _Pacer:
    """Due times of a room whose real-time clock starts at ``start``: chunk k is due k - 1
    intervals after it (one chunk ahead of playback, as worker.sender.Pacer)."""

    def __init__(self, start: float) -> None:
        self.start, self.k = start, -1

    def start_utterance(self) -> None:
        pass

    def audio_due(self, seconds: float) -> float:
        self.k += 1
        return self.start + (self.k - 1) * seconds

    def message_due(self) -> float:
        return 0.0


class _Store:
    def __init__(self) -> None:
        self.batches: list[list[tuple[str, int]]] = []

    def move_many(self, calls: list[MoveCall]) -> list[Moved]:
        self.batches.append([(c.conversation_id, c.chunk) for c in calls])
        return [Moved(True, 0, True) for _ in calls]


class _Sender:
    folds = True

    def __init__(self, cid: str, store: _Store, start: float) -> None:
        self.cid, self.store, self.pacer = cid, store, _Pacer(start)
        self.wake = threading.Event()
        self.finished = threading.Event()

    def stopping(self) -> bool:
        return False

    def check_interrupt(self) -> None:
        pass

    def take_reader(self, entry: dict[str, Any]) -> ReadAhead:
        def pieces() -> Iterator[tuple[bytes, bool]]:
            for k in range(CHUNKS):
                yield bytes(1920), k == CHUNKS - 1

        reader = ReadAhead(self.cid, pieces, ahead=CHUNKS)
        return reader

    def prepare_paced_chunk(self, entry: dict[str, Any], index: int, pcm: bytes, last: bool) -> PreparedChunk:
        return PreparedChunk(MoveCall(self.cid, "me", 0, index + 1), time.monotonic())

    def commit_paced_chunk(self, entry: dict[str, Any], prepared: PreparedChunk, moved: Moved) -> None:
        pass

    def finish_sent(self, entry: dict[str, Any], sent: int, t0: float, *, paced: str | None = None) -> None:
        self.finished.set()

    def drop_prefetched(self) -> None:
        pass


class _Owner(Owner):
    def __init__(self, cid: str) -> None:
        self.cid = cid
        self.outcomes: list[str] = []

    def loop_released(self, outcome: str) -> None:
        self.outcomes.append(outcome)


def test_rooms_due_within_one_tick_share_one_round_trip() -> None:
    """Two rooms whose clocks start 3 ms apart, inside one tick: from chunk 1 on (chunk 0 goes
    as soon as each is handed over) each pair of chunks goes in one call."""
    tick = 0.01
    store = _Store()
    loop = PacingLoop(ring=lambda cid: None, drop=lambda cid, reason: None, tick_s=tick)
    loop.start()
    try:
        base = on_grid(time.monotonic() + 0.1, tick)
        senders, owners = [], []
        for cid, offset in (("a", 0.001), ("b", 0.004)):
            sender, owner = _Sender(cid, store, base + offset), _Owner(cid)
            senders.append(sender)
            owners.append(owner)
            entry = {"utterance_id": f"u-{cid}", "sample_rate": 24000, "seq": 0}
            with pytest.raises(Handed):
                loop.hand(owner, sender, entry, 0)  # type: ignore[arg-type]
        for sender in senders:
            assert sender.finished.wait(30), sender.cid
    finally:
        loop.stop()
    sent = [item for batch in store.batches for item in batch]
    assert sorted(sent) == sorted((cid, k + 1) for cid in "ab" for k in range(CHUNKS))  # each chunk once
    for cid in "ab":
        assert [k for c, k in sent if c == cid] == list(range(1, CHUNKS + 1))  # in order
    paired = [batch for batch in store.batches if sorted(batch) == [("a", batch[0][1]), ("b", batch[0][1])]]
    assert len(paired) >= CHUNKS - 1, store.batches
    assert all(owner.outcomes == ["sent"] for owner in owners)


def test_pacing_lateness_counts_from_when_a_chunk_was_due_never_from_before_its_utterance(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The pacer keeps a chunk ahead of playback, so an utterance's first chunk is due one
    interval before its clock starts: the lateness metric must not count that interval."""
    from worker import metrics, pacing
    from worker import sender as sender_module
    from worker.pacing import Playout
    from worker.settings import Settings

    now = [100.0]
    monkeypatch.setattr(pacing.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(sender_module.time, "monotonic", lambda: now[0])
    seen: list[float] = []
    monkeypatch.setattr(metrics, "pacing_lateness", seen.append)

    class Reader:
        def poll(self) -> tuple[str, tuple[bytes, bool]]:
            return "chunk", (bytes(1920), False)  # 40 ms at 24 kHz

    sender = _Sender("a", _Store(), 0.0)
    sender.pacer = sender_module.Pacer(Settings(pacing="realtime"))  # type: ignore[assignment]
    sender.pacer.start_utterance()
    playout = Playout(_Owner("a"), sender, {"utterance_id": "u", "sample_rate": 24000, "seq": 0}, 0,
                      Reader(), tick=0.01)  # type: ignore[arg-type]
    for k, at in enumerate((100.002, 100.003, 100.045, 100.081)):
        now[0] = at
        prepared = playout.advance()
        assert isinstance(prepared, PreparedChunk), (k, prepared)
        playout.committed(prepared, Moved(True, 0, True))
    # chunk k is due at 100 + (k - 1) * 0.04 (chunk 0 at 100 itself, when its utterance started)
    assert seen == pytest.approx([0.002, 0.003, 0.005, 0.001], abs=1e-9)
