"""Python's cyclic garbage collector in a worker: watched, and kept off what never dies.

A full (generation 2) collection walks every object the collector tracks, holding the GIL the
whole time: every thread of the process stops, the pacing loop too. Many of those objects are
alive from start-up (Celery's machinery, modules, classes) and never become garbage. With a
hundred rooms playing, a worker tracked ~114,000 objects and full collections took 114–199 ms on
the 2-core test machine, stalling paced rooms past what real-time pacing catches up (200 ms), so
they heard a gap (BENCHMARKS.md, seventh part).

:func:`install` moves everything alive when the worker is ready (modules, classes, Celery's
machinery) into the collector's permanent generation (:func:`gc.freeze`), so full collections
walk only what was made since, and times every full collection: ``echoq_gc_pause_seconds``, and
a ``gc.pause`` log line when one is long enough to be heard.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from . import metrics
from .logs import step

log = logging.getLogger("echoq.gc")

#: a full collection at least this long is logged (real-time pacing catches up 200 ms)
LOG_AT_S = 0.1

_started = [0.0]


def _watch(phase: str, info: dict[str, Any]) -> None:
    if info.get("generation") != 2:
        return
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    seconds = time.perf_counter() - _started[0]
    metrics.gc_pause(seconds)
    if seconds >= LOG_AT_S:
        step(log, "gc.pause", logging.WARNING, ms=round(seconds * 1000, 1), collected=info.get("collected"),
             tracked=len(gc.get_objects(2)))


def install(*, freeze: bool = True) -> None:
    """Time full collections from now on; with ``freeze``, first take everything alive now out
    of their reach. Called once a worker is ready; calling it again changes nothing more."""
    if _watch not in gc.callbacks:
        gc.callbacks.append(_watch)
    if freeze:
        gc.collect()  # what is garbage already should not be frozen with the rest
        gc.freeze()
    step(log, "gc.ready", frozen=gc.get_freeze_count(), tracked=len(gc.get_objects()))


def uninstall() -> None:
    """Stop timing collections and give the frozen objects back to the collector (tests)."""
    if _watch in gc.callbacks:
        gc.callbacks.remove(_watch)
    gc.unfreeze()
