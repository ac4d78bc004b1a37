"""The fault rig: a private Redis with AOF, real worker processes, the replica simulator, a client.

Faults that stop, stall or restart Redis must not touch the shared Redis, so every fault test
runs against a ``redis-server`` of its own (a free port, a temp dir, ``--appendonly yes
--appendfsync everysec``), which the workers, the simulator and the client all use. Figures
(counts and recovery times, never asserted) go to the JSON lines file named by
``ECHOQ_FAULTS_REPORT`` when it is set; ``scripts/faults_report.py`` renders them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import IN_CI
from tests.integration.conftest import FAST_ENV, Workers, running_simulator, wait_for

REPORT_ENV = "ECHOQ_FAULTS_REPORT"
#: how a fault test's workers pace: 25 messages a second on the sender's own thread (burst pacing
#: with a cap), or real time on the pacing loop (one thread per worker sends every room's audio),
#: or burst pacing with no cap, where back-to-back texts go in one script and audio chunks 8 to a
#: round trip ("batched": its room is slowed instead, see room_url)
PACINGS: dict[str, dict[str, str]] = {"capped": {"ECHOQ_MAX_MESSAGES_PER_SECOND": "25"},
                                      "loop": {"ECHOQ_PACING": "realtime"},
                                      "batched": {}}


def room_url(room: str, pacing: str) -> str:
    """The loopback URL of ``room`` for a pacing: with no cap, each message takes 20 ms to go
    (the room's own delay), so a fault lands mid-utterance and mid-batch."""
    return f"loopback://{room}" + ("?send_delay=0.02" if pacing == "batched" else "")


def loop_paced(workers: Workers) -> int:
    """How many utterances the workers' pacing loops took (their logs say so)."""
    return sum(w.log().count("pacing.took") for w in workers.started)


def batch_sent(workers: Workers) -> int:
    """How many text utterances went in the one-script way (their ``utterance.sent`` says how
    many went with them)."""
    return sum(w.log().count(" batch=") for w in workers.started)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrivateRedis:
    """A ``redis-server`` this test owns: it may be shut down, restarted and frozen at will."""

    dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    bind: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", *self.bind.split(), "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "no",
             "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        wait_for(lambda: _pings(probe), 15, what=f"the private redis-server on port {self.port}")
        probe.close()

    def shutdown(self) -> None:
        """``SHUTDOWN``: Redis writes its AOF and exits, as an operator's restart would."""
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(port=self.port).shutdown()
        assert self.proc is not None
        self.proc.wait(15)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is required for the fault suite under CI")
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path / "redis", _free_port())
    server.dir.mkdir()
    server.start()
    yield server
    server.stop()


@dataclass
class Rig:
    """Everything one fault test needs, all on the private Redis."""

    redis: PrivateRedis
    client_redis: redis.Redis
    workers: Workers
    client: Any
    simulator: Any
    tmp: Path

    def start_workers(self, count: int, **env: str) -> list[Any]:
        return self.workers.start(count, ECHOQ_REDIS_URL=self.redis.url, **env)


@pytest.fixture
def rig(private_redis: PrivateRedis, tmp_path: Path) -> Iterator[Rig]:
    from celery import Celery

    from producer.client import EchoqClient

    client_redis = redis.Redis.from_url(private_redis.url)
    # the client's doorbells go to the private Redis too, not to the app's configured broker
    app = Celery("echoq-faults", broker=private_redis.url, set_as_current=False)
    app.conf.broker_transport_options = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2}
    app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2}
    client = EchoqClient(private_redis.url, redis_client=client_redis, celery_app=app)
    workers = Workers(tmp_path, client_redis)
    try:
        with running_simulator(client_redis, tmp_path / "sim", url=private_redis.url) as sim:
            yield Rig(private_redis, client_redis, workers, client, sim, tmp_path)
    finally:
        # SIGCONT first: a worker or Redis left frozen by a failing test must still be stoppable
        for w in workers.started:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGCONT)
        if private_redis.proc is not None and private_redis.proc.poll() is None:
            private_redis.thaw()
        workers.stop_all()
        app.close()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A dict the test fills with its figures; written as one JSON line when the test passed."""
    out: dict[str, Any] = {}
    yield out
    path = os.environ.get(REPORT_ENV)
    rep = getattr(request.node, "rep_call", None)
    if path and out:
        out.update(test=request.node.nodeid.split("::")[-1], passed=bool(rep and rep.passed),
                   date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with open(path, "a") as f:
            f.write(json.dumps(out) + "\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep


__all__ = ["FAST_ENV", "PrivateRedis", "Rig", "wait_for"]
