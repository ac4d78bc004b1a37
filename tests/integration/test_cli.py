"""The echoq CLI as a user runs it: help, exit codes, --json, --wait with progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import ROOT, Workers, wire
from worker import keys

pytestmark = pytest.mark.redis


def echoq(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "ECHOQ_REDIS_URL": TEST_REDIS_URL, **(env or {})}
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["", "worker", "simulate", "open", "close", "show", "say", "play", "interrupt", "status"])
def test_every_command_explains_itself(command: str) -> None:
    res = echoq(*([command] if command else []), "--help")
    assert res.returncode == 0, res.stderr
    assert "usage: echoq" in res.stdout


def test_exit_codes_for_bad_input_unknown_things_and_no_redis(redis_client: redis.Redis, tmp_path: Path) -> None:
    assert echoq("open", "c1", "--url", "loopback://r").returncode == 0
    res = echoq("say", "ghost", "hi")
    assert res.returncode == 3 and "no conversation 'ghost'" in res.stderr
    res = echoq("say", "c1", "")
    assert res.returncode == 2 and "text is empty" in res.stderr
    (tmp_path / "bad.wav").write_bytes(b"RIFF nonsense")
    res = echoq("play", "c1", str(tmp_path / "bad.wav"))
    assert res.returncode == 2 and res.stderr.startswith("echoq: ")
    assert "Traceback" not in res.stderr
    res = echoq("open", "c2", "--url", "ftp://nowhere")
    assert res.returncode == 2 and "loopback://NAME" in res.stderr
    res = echoq("status", "nope")
    assert res.returncode == 3
    res = echoq("say", "c1", "hi", env={"ECHOQ_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert res.returncode == 5 and "Redis is unreachable" in res.stderr
    assert redis_client.llen(keys.conv_log("c1")) == 0  # nothing was enqueued by the failures


def test_say_and_play_wait_with_progress_and_json(workers: Workers, simulator: Any, redis_client: redis.Redis,
                                                  tmp_path: Path) -> None:
    workers.start(1)
    assert echoq("open", "cli", "--url", "loopback://cli").returncode == 0
    res = echoq("say", "cli", "Hello there!", "--wait", "--json")
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["state"] in ("sent", "spoken") and rec["kind"] == "text"

    clip = tmp_path / "clip.wav"
    with wave.open(str(clip), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.arange(48000) / 5) * 9000).astype("<i2").tobytes())
    res = echoq("play", "cli", str(clip), "--sample-rate", "16000", "--wait")
    assert res.returncode == 0, res.stderr
    assert "/75 chunks" in res.stderr  # progress: 3 s of 40 ms chunks
    assert res.stdout.strip().endswith(("sent", "spoken"))
    rates = {m["properties"].get("sample_rate") for m in wire(redis_client, "cli") if m["properties"]["modality"] == "audio"}
    assert rates == {16000}

    show = json.loads(echoq("show", "cli", "--json").stdout)
    assert show["owner"] == workers.started[0].name and show["backlog"] == 0
