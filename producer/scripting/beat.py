"""Names and RedBeat wiring shared by the schedule store, the run engine and their tasks.

Every process that reads or writes schedule entries (beat, workers, producers) must agree on the
task names and RedBeat's key prefix, so they come from this one module, which imports no other
part of :mod:`producer.scripting`.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

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
