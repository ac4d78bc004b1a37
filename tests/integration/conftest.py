"""Real worker processes, a real replica simulator and a producer client on the test database."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import TEST_REDIS_URL
from worker import keys

ROOT = Path(__file__).resolve().parents[2]

#: settings that keep ownership hand-overs and retries quick in tests
FAST_ENV = {
    "ECHOQ_LEASE_TTL_S": "2",
    "ECHOQ_SCAN_INTERVAL_S": "0.25",
    "ECHOQ_REPLICA_WAIT_TIMEOUT_S": "15",
    "ECHOQ_RETRY_BASE_DELAY_S": "0.005",
    "ECHOQ_RETRY_MAX_DELAY_S": "0.05",
    "ECHOQ_RETRY_MAX_ATTEMPTS": "12",
    "ECHOQ_LOG_LEVEL": "INFO",
}


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy; fail the test with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wire(client: redis.Redis, room: str) -> list[dict[str, Any]]:
    """Every app message sent into a loopback room, in order."""
    return [json.loads(fields[b"data"]) for _id, fields in client.xrange(keys.loopback_room(room))]


def heard_everything(simulator: Any, client: redis.Redis, room: str, timeout: float = 15.0) -> dict[str, Any]:
    """The simulator's report of ``room`` once it has taken every message on the wire (it reads
    rooms on its own schedule, so a report read straight after a send may not have it yet)."""
    sent = len(wire(client, room))
    return wait_for(lambda: (r := simulator.report()["rooms"].get(room)) and r["messages"] >= sent and r,
                    timeout, what=f"the simulator to take all {sent} messages of {room}")


@dataclass
class WorkerProc:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.stopped(timeout)

    def stopped(self, timeout: float = 30.0) -> int:
        """Wait for the process to end (killed after ``timeout``); its exit status."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        return int(self.proc.returncode)


@dataclass
class Workers:
    tmp: Path
    client: redis.Redis
    started: list[WorkerProc] = field(default_factory=list)

    def start(self, count: int = 1, **env: str) -> list[WorkerProc]:
        out = []
        for _ in range(count):
            name = f"echoq-test-{uuid.uuid4().hex[:6]}@localhost"
            log_path = self.tmp / f"{name.split('@')[0]}.log"
            full_env = {**os.environ, **FAST_ENV, "ECHOQ_REDIS_URL": TEST_REDIS_URL, **env}
            proc = subprocess.Popen(
                [sys.executable, "-m", "producer.cli", "worker", "-c", "6", "-n", name],
                cwd=ROOT, env=full_env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
            )
            w = WorkerProc(name, proc, log_path)
            self.started.append(w)
            out.append(w)
        for w in out:
            wait_for(lambda w=w: w.proc.poll() is not None or self.client.hexists(keys.WORKERS, w.name), 30,
                     what=f"worker {w.name} to report in")
            if w.proc.poll() is not None:
                pytest.fail(f"worker {w.name} exited with {w.proc.returncode}:\n{w.log()[-3000:]}")
        return out

    def owner(self, conversation_id: str) -> WorkerProc | None:
        token = self.client.get(keys.lease(conversation_id))
        if not token:
            return None
        name = token.decode().split(":")[0]
        return next((w for w in self.started if w.name == name), None)

    def stop_all(self) -> None:
        """SIGTERM to every worker at once, then wait for each: their warm shutdowns overlap."""
        for w in self.started:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in self.started:
            w.stopped()


@pytest.fixture
def workers(redis_client: redis.Redis, tmp_path: Path) -> Iterator[Workers]:
    ws = Workers(tmp_path, redis_client)
    yield ws
    ws.stop_all()


@contextlib.contextmanager
def running_simulator(redis_client: redis.Redis, out: Path, speed: float = 50.0, url: str = TEST_REDIS_URL
                      ) -> Iterator[Any]:
    """The replica simulator in a thread, present in the room until the block ends."""
    from worker.simulator import Simulator

    sim = Simulator(redis.Redis.from_url(url), out, speed=speed)
    stop = threading.Event()
    thread = threading.Thread(target=sim.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: redis_client.exists(keys.SIMULATOR_ALIVE), 10, what="the simulator")
        yield sim
    finally:
        stop.set()
        thread.join(10)


@pytest.fixture
def simulator(redis_client: redis.Redis, tmp_path: Path) -> Iterator[Any]:
    """The simulator at 50× speed: replica events come quickly."""
    with running_simulator(redis_client, tmp_path / "sim") as sim:
        yield sim


@pytest.fixture
def prefix(monkeypatch: pytest.MonkeyPatch) -> str:
    """A RedBeat key prefix of this test's own, for this process and every child."""
    from producer.scripting.beat import REDBEAT_PREFIX_ENV

    value = f"echoq:test-redbeat-{uuid.uuid4().hex[:8]}:"
    monkeypatch.setenv(REDBEAT_PREFIX_ENV, value)
    return value


@pytest.fixture
def client(redis_client: redis.Redis) -> Any:
    from producer.client import EchoqClient

    return EchoqClient(TEST_REDIS_URL)
