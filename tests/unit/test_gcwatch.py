"""Full garbage collections in a worker: frozen out of what was alive at start, timed, logged."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from worker import gcwatch, metrics


@pytest.fixture
def watched() -> Iterator[None]:
    yield
    gcwatch.uninstall()


def _collections_seen() -> float:
    return next(s.value for m in metrics.GC_PAUSE_SECONDS.collect() for s in m.samples
                if s.name.endswith("_count"))


def test_install_freezes_what_is_alive_so_full_collections_walk_only_what_came_after(watched: None) -> None:
    before = len(gc.get_objects())
    gcwatch.install(freeze=True)
    assert gc.get_freeze_count() >= before // 2  # the process's objects, out of the collector's reach
    assert len(gc.get_objects()) < before // 10
    gcwatch.uninstall()
    assert gc.get_freeze_count() == 0


def test_without_freeze_nothing_is_frozen_but_collections_are_still_timed(watched: None) -> None:
    gcwatch.install(freeze=False)
    assert gc.get_freeze_count() == 0
    seen = _collections_seen()
    gc.collect()
    assert _collections_seen() == seen + 1
    gc.collect(0)  # a young collection is not a stall worth counting
    assert _collections_seen() == seen + 1


def test_a_long_full_collection_is_logged_with_its_length(watched: None, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(gcwatch, "LOG_AT_S", 0.0)  # every full collection counts as long
    gcwatch.install(freeze=False)
    with caplog.at_level("WARNING", logger="echoq"):
        gc.collect()
    (line,) = [r.getMessage() for r in caplog.records if "gc.pause" in r.getMessage()]
    assert "ms=" in line and "tracked=" in line, line


def test_install_twice_watches_once(watched: None) -> None:
    gcwatch.install(freeze=False)
    gcwatch.install(freeze=False)
    assert gc.callbacks.count(gcwatch._watch) == 1
