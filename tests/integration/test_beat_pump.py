"""Beat publishes its safety-net ``echoq.script.pump`` only when a script run is overdue, so an
idle system puts no pump row a second into Flower (where it buried the ``echoq.drain`` rows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from producer.scripting.beat import REDBEAT_PREFIX_ENV, TASK_PUMP
from producer.scripting.runs import RUNS_DUE
from producer.scripting.scheduler import overdue_runs
from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import FAST_ENV, ROOT, WorkerProc, wait_for
from worker import keys

pytestmark = pytest.mark.redis


def queued_tasks(client: redis.Redis) -> list[str]:
    """Names of the tasks waiting in the control queue (no worker consumes it in this test)."""
    return [json.loads(raw)["headers"]["task"] for raw in client.lrange(keys.CONTROL_QUEUE, 0, -1)]


def test_overdue_runs_means_due_for_longer_than_the_grace(redis_client: redis.Redis) -> None:
    now = 1_800_000_000.0
    assert not overdue_runs(redis_client, now)
    redis_client.zadd(RUNS_DUE, {"run-a": now - 0.5})  # due, but its own pump is not late yet
    assert not overdue_runs(redis_client, now)
    redis_client.zadd(RUNS_DUE, {"run-b": now - 3})
    assert overdue_runs(redis_client, now)


def test_beat_publishes_the_pump_only_while_a_run_is_overdue(redis_client: redis.Redis, prefix: str,
                                                             tmp_path: Path) -> None:
    log_path = tmp_path / "beat.log"
    env = {**os.environ, **FAST_ENV, "ECHOQ_REDIS_URL": TEST_REDIS_URL, REDBEAT_PREFIX_ENV: prefix,
           "ECHOQ_LOG_LEVEL": "DEBUG"}
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "beat", "--max-interval", "1"], cwd=ROOT,
                            env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    beat = WorkerProc("beat", proc, log_path)
    try:
        # RedBeat extends its lock once a tick: let beat look at the pump entry a few times
        wait_for(lambda: beat.log().count("beat: Extending lock") >= 4, 60, what="four beat ticks")
        assert TASK_PUMP not in queued_tasks(redis_client), beat.log()[-2000:]

        redis_client.zadd(RUNS_DUE, {"run-overdue": time.time() - 5})
        wait_for(lambda: TASK_PUMP in queued_tasks(redis_client), 30, what="beat to publish the pump")
    finally:
        beat.stop()
    assert "Traceback" not in beat.log()
