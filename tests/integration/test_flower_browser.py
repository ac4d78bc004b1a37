"""Flower seen in a real browser: Redis, a worker, the simulator and Flower (basic auth), one
utterance, then Flower's tasks page rendered by headless Chromium shows the task that sent it
with its final state. The screenshot is kept in ``artifacts/flower-tasks.png``.

Chromium is Debian's ``chromium`` package (``scripts/setup.sh --test`` installs it): the test
skips locally when it is missing and fails under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.conftest import IN_CI, TEST_REDIS_URL
from tests.integration.conftest import ROOT, Workers, wait_for

pytestmark = pytest.mark.redis

ARTIFACTS = ROOT / "artifacts"
#: Flower's tasks table: the default columns plus arguments and result (ids and chunk counts only)
TASKS_COLUMNS = "name,uuid,state,args,result,runtime,worker,received"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Flower:
    """A running ``echoq flower`` with basic auth, and a small client for its HTTP API."""

    port: int
    user: str
    password: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def url(self, path: str, *, credentials: bool = False) -> str:
        auth = f"{self.user}:{self.password}@" if credentials else ""
        return f"http://{auth}127.0.0.1:{self.port}{path}"

    def get(self, path: str, **params: Any) -> requests.Response:
        resp = requests.get(self.url(path), params=params, auth=(self.user, self.password), timeout=15)
        resp.raise_for_status()
        return resp

    def api(self, path: str, **params: Any) -> Any:
        return self.get(path, **params).json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def run_flower(tmp: Path) -> Iterator[Flower]:
    """Start ``echoq flower`` on a free port of 127.0.0.1 against the test database; stop it after."""
    port = free_port()
    user, password = "echoq-test", uuid.uuid4().hex
    env = {**os.environ, "ECHOQ_REDIS_URL": TEST_REDIS_URL, "FLOWER_BASIC_AUTH": f"{user}:{password}",
           "FLOWER_TASKS_COLUMNS": TASKS_COLUMNS}
    log_path = tmp / "flower.log"
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "flower", "--port", str(port)], cwd=ROOT,
                            env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    flower = Flower(port, user, password, proc, log_path)

    def healthy() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"flower exited with {proc.returncode}:\n{flower.log()[-3000:]}")
        try:
            return requests.get(flower.url("/healthcheck"), timeout=2).text.strip() == "OK"
        except requests.RequestException:
            return False

    try:
        wait_for(healthy, 30, interval=0.1, what="Flower's /healthcheck")
        yield flower
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def flower(redis_client: redis.Redis, tmp_path: Path) -> Iterator[Flower]:
    with run_flower(tmp_path) as f:
        yield f


def chromium_or_skip() -> str:
    """Debian's chromium; skipped locally when missing, a failure under CI."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if IN_CI:
            pytest.fail("chromium is required under CI (scripts/setup.sh --test installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def chromium(browser: str, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium once on ``url`` with a fresh profile; stdout is whatever ``extra`` asks for."""
    with tempfile.TemporaryDirectory(prefix="echoq-chromium-") as profile:
        # the page fills its table from /tasks/datatable: virtual time lets those requests finish
        argv = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=8000", *extra, url]
        return subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)


def task_row(dom: str, task_id: str) -> str | None:
    """The tasks table row of ``task_id`` in a rendered DOM, as text without tags."""
    match = re.search(rf'<tr[^>]*\bid="{re.escape(task_id)}"[^>]*>(.*?)</tr>', dom, re.S)
    if match is None:
        return None
    return html.unescape(re.sub(r"<[^>]+>", " ", match.group(1)))


def drain_task_that_sent(flower: Flower, conversation_id: str) -> str | None:
    """The id of the finished ``echoq.drain`` task that sent an utterance of the conversation."""
    tasks = flower.api("/api/tasks", taskname="echoq.drain", state="SUCCESS")
    for task_id, task in tasks.items():
        if task["args"] == repr([conversation_id]) and "'utterances': 1" in str(task["result"]):
            return str(task_id)
    return None


def test_flower_tasks_page_in_headless_chromium_shows_the_task_with_its_final_state(
    workers: Workers, simulator: Any, client: Any, flower: Flower
) -> None:
    browser = chromium_or_skip()
    workers.start(1)
    client.open("conv-web", "loopback://room-web")
    uid = client.say("conv-web", "Seen in a browser.")
    assert client.wait(uid, timeout=30)["state"] in ("sent", "spoken")
    task_id = wait_for(lambda: drain_task_that_sent(flower, "conv-web"), 30, what="the drain task in Flower")

    page = flower.url("/tasks", credentials=True)

    def rendered_row() -> str | None:
        done = chromium(browser, page, "--dump-dom")
        row = task_row(done.stdout, task_id)
        return row if row and "SUCCESS" in row else None

    row = wait_for(rendered_row, 60, interval=0.5, what=f"task {task_id} with SUCCESS on Flower's tasks page")
    assert "echoq.drain" in row and "conv-web" in row
    assert "Seen in a browser." not in row

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "flower-tasks.png"
    shot.unlink(missing_ok=True)
    done = chromium(browser, page, f"--screenshot={shot}", "--window-size=1400,900", "--hide-scrollbars")
    assert shot.is_file() and shot.stat().st_size > 10_000, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
