"""What a newcomer sees: no tracebacks for a bad Redis URL or a worker stopped while Redis is
down, ``show`` for people, the same typed JSON from the CLI, the API and its event stream,
progress that never shows more sent than a total, and a directory named as one."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.records import FLOAT_FIELDS, INT_FIELDS, is_time_field
from tests.integration.conftest import FAST_ENV, ROOT, Workers, wait_for, wire
from tests.integration.test_api import Api, serve, sse_events_all  # noqa: F401  (the serve fixture)
from tests.integration.test_cli import echoq
from tests.integration.test_delivery import tone_wav
from tests.integration.test_flower_browser import free_port
from worker import keys
from worker.echo import STOPPED_SPEAKING

NUMERIC = INT_FIELDS | FLOAT_FIELDS


def untyped(record: Any, where: str = "") -> list[str]:
    """Fields that should be numbers but are strings, anywhere in ``record``."""
    found: list[str] = []
    if isinstance(record, dict):
        for key, value in record.items():
            if (key in NUMERIC or is_time_field(key)) and isinstance(value, str):
                found.append(f"{where}{key}={value!r}")
            found += untyped(value, f"{where}{key}.")
    elif isinstance(record, list):
        for n, item in enumerate(record):
            found += untyped(item, f"{where}{n}.")
    return found


def test_a_bad_redis_url_prints_one_line_and_no_traceback() -> None:
    res = echoq("say", "c1", "hi", env={"ECHOQ_REDIS_URL": "not-a-url"})
    assert res.returncode == 2
    assert res.stderr == "echoq: ECHOQ_REDIS_URL is not a Redis URL: it must start with redis://, rediss:// or unix://\n"


def test_a_worker_stopped_while_redis_is_unreachable_logs_no_traceback(tmp_path: Path) -> None:
    """Redis never answers, so the worker never becomes ready: stopping it has nothing to hand
    back, and says nothing about session managers or shutdown failures."""
    log_path = tmp_path / "worker.log"
    env = {**FAST_ENV, "ECHOQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "-c", "2"], cwd=ROOT, env=env,
                            stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "Cannot connect to redis" in log_path.read_text(errors="replace"), 60,
                 what="the worker to try Redis")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = log_path.read_text(errors="replace")
    assert "Warm shutdown" in log  # it was stopped, not killed
    for phrase in ("Traceback", "session manager", "shutdown of sessions failed"):
        assert phrase not in log, f"{phrase!r} in the worker's log:\n{log[-3000:]}"


@pytest.mark.redis
def test_show_is_for_people_and_cli_api_and_events_agree_on_types(
    workers: Workers, simulator: Any, redis_client: redis.Redis, tmp_path: Path,
    serve: Callable[..., Api],  # noqa: F811  (the fixture imported above)
) -> None:
    workers.start(1)
    assert echoq("open", "types", "--url", "loopback://types").returncode == 0
    said = echoq("say", "types", "Twelve chars", "--wait", "--json")
    assert said.returncode == 0, said.stderr
    uid = json.loads(said.stdout)["id"]
    clip = tone_wav(tmp_path / "clip.wav", 0.8)
    played = echoq("play", "types", str(clip), "--wait", "--json")
    assert played.returncode == 0, played.stderr
    pid = json.loads(played.stdout)["id"]
    api = serve()
    spoken = wait_for(lambda: (r := api.http.get(f"/v1/utterances/{pid}").json())["state"] == "spoken" and r, 30,
                      what="the clip to be spoken")

    # the CLI's --json, the API and the event stream: numbers are numbers, times epoch seconds
    status = json.loads(echoq("status", uid, "--json").stdout)
    assert status["chars"] == 12 and isinstance(status["enqueued_at"], float) and status["seq"] == 1
    show = json.loads(echoq("show", "types", "--json").stdout)
    conv = api.http.get("/v1/conversations/types").json()
    assert isinstance(show["created_at"], float) and show["created_at"] == conv["created_at"]
    assert conv["cursor"] == {"seq": 2, "chunk": 0} and conv["backlog"] == 0 and conv["utterances"] == 2
    assert spoken["chunks_total"] == spoken["chunks_sent"] == 20 and isinstance(spoken["duration"], float)
    assert spoken["duration_in"] == 0.8 and spoken["sample_rate"] == 24000
    events = [e for _id, e in sse_events_all(api, "types")]
    assert events and all(isinstance(e["ts"], float) for e in events)
    stopped = [e for e in events if e["type"] == "replica." + STOPPED_SPEAKING.rsplit(".", 1)[-1]]
    assert stopped and isinstance(stopped[0]["duration"], float) and stopped[0]["interrupted"] is False
    for where, record in (("status", status), ("show", show), ("api conversation", conv), ("api utterance", spoken),
                          ("events", events)):
        assert untyped(record) == [], f"{where}: {untyped(record)}"

    # and without --json: one field a line, ISO-8601 UTC, no Python reprs
    text = echoq("show", "types").stdout
    assert not re.search(r"[{}\[\]']|None", text), text
    assert re.search(r"^cursor\s+utterance 2 done, next chunk 0$", text, re.M), text
    assert re.search(r"^created_at\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", text, re.M), text


@pytest.mark.redis
def test_microphone_progress_counts_frames_and_never_exceeds_a_total(
    workers: Workers, simulator: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    workers.start(1)
    assert echoq("open", "mic-progress", "--url", "loopback://mic-progress", "--mode", "microphone").returncode == 0
    clip = tone_wav(tmp_path / "clip.wav", 1.5)
    res = echoq("play", "mic-progress", str(clip), "--wait")
    assert res.returncode == 0, res.stderr
    counts = re.findall(r" (\d+)(?:/(~?)(\d+))? chunks", res.stderr)
    assert counts, res.stderr
    for sent, mark, total in counts:
        if total:
            assert int(sent) <= int(total), res.stderr  # never "101/75"
            assert (mark == "~") or int(sent) == int(total), res.stderr
    frames = len(redis_client.xrange(keys.loopback_mic("mic-progress")))
    assert frames == 75  # 1.5 s of 20 ms frames
    assert counts[-1] == (str(frames), "", str(frames)), res.stderr  # the end: frames, counted exactly
    assert wire(redis_client, "mic-progress") == []  # microphone mode sends no app messages


@pytest.mark.redis
def test_play_names_a_directory_as_one(redis_client: redis.Redis, tmp_path: Path) -> None:
    assert echoq("open", "dir", "--url", "loopback://dir").returncode == 0
    folder = tmp_path / "some_folder"
    folder.mkdir()
    res = echoq("play", "dir", f"{folder}/")
    assert res.returncode == 2
    assert res.stderr == f"echoq: {folder} is a directory, not an audio file\n"
