"""Celery tasks for scheduled firings and script line pacing.

- ``echoq.schedule.fire(schedule_id, slot=None)``: published by RedBeat (``echoq beat``) for a
  schedule's entry. It derives the slot it stands for from the schedule and the clock (or takes
  ``slot``), and starts that slot's run at most once: a second firing of the same slot, from a
  second scheduler or a retried publish, finds the run record and does nothing.
- ``echoq.script.pump(run_id=None)``: moves script runs along. Beat publishes it every second
  (a static RedBeat entry) as a safety net for every due run; runs also publish it for
  themselves with short countdowns (at most :data:`~producer.scripting.beat.HINT_MAX_S`), so pauses are kept to the
  tenth of a second without a worker thread ever sleeping through one.

These tasks are thin views over :mod:`producer.scripting.schedules`, which holds the schedule store, and
:mod:`producer.scripting.runs`, the run engine (it enqueues through the producer client, the one path into
a conversation's log). They are producer work that runs in worker processes: ``echoq worker`` loads this module
with Celery's ``--include``, so the ``worker`` package itself never imports ``producer``.
"""

from __future__ import annotations

from typing import Any

from worker.celery_app import app

from .beat import TASK_FIRE, TASK_PUMP
from .runs import Runner
from .schedules import Schedules


@app.task(name=TASK_FIRE, ignore_result=True)
def fire(schedule_id: str, slot: str | None = None) -> dict[str, Any]:
    """Start the run of one schedule slot, at most once (see :meth:`Schedules.fire`)."""
    return Schedules.default().fire(schedule_id, slot=slot)


@app.task(name=TASK_PUMP, ignore_result=True)
def pump(run_id: str | None = None) -> dict[str, Any]:
    """Advance one run (``run_id``) or every run that is due."""
    runner = Runner.default()
    if run_id is not None:
        return {"run_id": run_id, "state": runner.hinted(run_id).get("state")}
    return {"advanced": runner.pump()}
