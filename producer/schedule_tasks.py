"""Celery tasks for scheduled firings and script line pacing, and the RedBeat wiring they share.

- ``echoq.schedule.fire(schedule_id, slot=None)``: published by RedBeat (``echoq beat``) for a
  schedule's entry. It derives the slot it stands for from the schedule and the clock (or takes
  ``slot``), and starts that slot's run at most once: a second firing of the same slot, from a
  second scheduler or a retried publish, finds the run record and does nothing.
- ``echoq.script.pump(run_id=None)``: moves script runs along. Beat publishes it every second
  (a static RedBeat entry) as a safety net for every due run; runs also publish it for
  themselves with short countdowns (at most :data:`HINT_MAX_S`), so pauses are kept to the
  tenth of a second without a worker thread ever sleeping through one.

These tasks are thin views over :mod:`producer.schedules`, which holds the schedule store, and
:mod:`producer.runs`, the run engine (it enqueues through the producer client, the one path into
a conversation's log). They are producer work that runs in worker processes: ``echoq worker`` loads this module
with Celery's ``--include``, so the ``worker`` package itself never imports ``producer``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from worker.celery_app import app

TASK_FIRE = "echoq.schedule.fire"
TASK_PUMP = "echoq.script.pump"
#: the static RedBeat entry that publishes the pump every second
PUMP_ENTRY = "echoq-script-pump"
PUMP_EVERY_S = 1.0
#: longest countdown a run gives its own pump message (PROTOCOL.md: keep ETAs short over Redis)
HINT_MAX_S = 5.0
#: environment variable with the RedBeat key prefix (schedule entries and the scheduler lock)
REDBEAT_PREFIX_ENV = "ECHOQ_REDBEAT_KEY_PREFIX"
DEFAULT_REDBEAT_PREFIX = "echoq:redbeat:"


def redbeat_prefix() -> str:
    """The RedBeat key prefix: ``ECHOQ_REDBEAT_KEY_PREFIX``, default ``echoq:redbeat:``."""
    return os.environ.get(REDBEAT_PREFIX_ENV) or DEFAULT_REDBEAT_PREFIX


def configure_redbeat(celery_app: Celery, redis_url: str, *, with_pump: bool = False) -> None:
    """Point RedBeat at ``redis_url`` with echoq's key prefix; ``with_pump`` adds the pump entry.

    Every process that reads or writes schedule entries (beat, workers, producers) must agree on
    both, so they come from one place.
    """
    conf: dict[str, Any] = {"redbeat_redis_url": redis_url, "redbeat_key_prefix": redbeat_prefix()}
    if with_pump:
        conf["beat_schedule"] = {PUMP_ENTRY: {"task": TASK_PUMP, "schedule": PUMP_EVERY_S,
                                              "options": {"expires": 30}}}
    celery_app.conf.update(conf)
    # RedBeat caches its config and connection on the app; drop them so the new values apply.
    for attr in ("redbeat_conf", "redbeat_redis"):
        if hasattr(celery_app, attr):
            delattr(celery_app, attr)
    from redbeat.schedulers import ensure_conf

    ensure_conf(celery_app)


@app.task(name=TASK_FIRE, ignore_result=True)
def fire(schedule_id: str, slot: str | None = None) -> dict[str, Any]:
    """Start the run of one schedule slot, at most once (see :meth:`Schedules.fire`)."""
    from .schedules import Schedules

    return Schedules.default().fire(schedule_id, slot=slot)


@app.task(name=TASK_PUMP, ignore_result=True)
def pump(run_id: str | None = None) -> dict[str, Any]:
    """Advance one run (``run_id``) or every run that is due."""
    from .runs import Runner

    runner = Runner.default()
    if run_id is not None:
        return {"run_id": run_id, "state": runner.hinted(run_id).get("state")}
    return {"advanced": runner.pump()}
