"""Decode-ahead: pieces come in order, a poll that found nothing is called back, the end is
announced while pieces still wait, errors come out where the pieces are read."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from worker.readahead import ReadAhead


def _gated(pieces: list[bytes], gate: threading.Event) -> Iterator[bytes]:
    yield pieces[0]
    gate.wait(10)
    yield from pieces[1:]


def _wait(event: threading.Event) -> None:
    assert event.wait(10), "no call back"


def test_a_poll_that_finds_nothing_is_called_back_when_the_next_piece_comes() -> None:
    gate, ready = threading.Event(), threading.Event()
    reader = ReadAhead("u1", lambda: _gated([b"a", b"b"], gate), ahead=4, on_ready=ready.set)
    try:
        got = None
        while got is None:  # the first piece, once the thread has put it
            got = reader.poll()
            if got is None:
                _wait(ready)
                ready.clear()
        assert got == ("frame", b"a")
        assert reader.poll() is None  # the second waits behind the gate
        gate.set()
        _wait(ready)
        assert reader.poll() == ("frame", b"b")
        end = None
        while end is None:
            end = reader.poll()
            if end is None:
                _wait(ready)
                ready.clear()
        assert end == ("end", None)
    finally:
        reader.close()


def test_the_end_is_announced_while_pieces_still_wait_to_be_taken() -> None:
    ended = threading.Event()
    reader = ReadAhead("u2", lambda: iter([b"a", b"b", b"c"]), ahead=8, on_end=ended.set)
    try:
        _wait(ended)  # nobody has taken a piece yet
        assert list(reader.frames()) == [b"a", b"b", b"c"]
    finally:
        reader.close()


def test_the_conversions_error_comes_out_of_poll_and_on_end_is_not_called() -> None:
    ended, ready = threading.Event(), threading.Event()

    def broken() -> Iterator[bytes]:
        yield b"a"
        raise ValueError("the decoder gave up")

    reader = ReadAhead("u3", broken, ahead=8, on_ready=ready.set, on_end=ended.set)
    try:
        seen = []
        with pytest.raises(ValueError, match="gave up"):
            while True:
                got = reader.poll()
                if got is None:
                    _wait(ready)
                    ready.clear()
                else:
                    seen.append(got)
        assert seen == [("frame", b"a")]
        assert not ended.is_set()
    finally:
        reader.close()


def test_a_full_buffer_is_refilled_once_half_of_it_was_taken_not_a_piece_at_a_time() -> None:
    """Waking the reader for every piece taken cost the pacing loop a thread switch per chunk:
    the reader waits until half of the buffer is gone, then fills it again."""
    pulled: list[int] = []
    changed = threading.Condition()

    def counting() -> Iterator[bytes]:
        for i in range(100):
            with changed:
                pulled.append(i)
                changed.notify_all()
            yield bytes([i])

    def wait_pulled(n: int) -> None:
        with changed:
            assert changed.wait_for(lambda: len(pulled) >= n, 10), f"{len(pulled)} pieces read, not {n}"

    reader = ReadAhead("u5", counting, ahead=10)
    try:
        wait_pulled(11)  # ten wait in the buffer, the eleventh waits for room
        taken = [reader.poll() for _ in range(4)]  # six left: more than half
        assert taken == [("frame", bytes([i])) for i in range(4)]
        assert not reader._thread.join(0.3) and len(pulled) == 11  # still waiting for room
        assert reader.poll() == ("frame", bytes([4]))  # five left: half
        wait_pulled(16)  # filled again to ten, and the next one read
        got = [reader.poll() for _ in range(10)]
        assert got == [("frame", bytes([i])) for i in range(5, 15)]  # in order, none lost
    finally:
        reader.close()
