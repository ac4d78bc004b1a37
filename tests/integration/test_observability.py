"""What operators see: Flower's HTTP API, a worker's Prometheus metrics, and its JSON log lines.

Each test drives real worker processes over loopback rooms with the replica simulator, then
reads what Flower, ``/metrics`` and the log say, and checks that none of it carries an
utterance's text, its audio, or a secret.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import wave
from collections import defaultdict
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import requests
from celery.result import AsyncResult
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Workers, running_simulator, wait_for, wire
from tests.integration.test_flower_browser import Flower, free_port, run_flower
from worker.celery_app import app as celery_app
from worker.logs import JsonFormatter
from worker.simulator import Simulator
from worker.store import Store

pytestmark = pytest.mark.redis

SECRET = "sk-test-secret"
#: 25 messages a second: a 3 s clip (75 chunks of 40 ms) takes 3 s to send, long enough to watch
PACED = {"ECHOQ_MAX_MESSAGES_PER_SECOND": "25"}
#: 50 messages a second: twice real time, so a real-time replica is still speaking when the last chunk is sent
FAST_SEND = {"ECHOQ_MAX_MESSAGES_PER_SECOND": "50"}


@pytest.fixture
def realtime_simulator(redis_client: redis.Redis, tmp_path: Path) -> Iterator[Simulator]:
    """The replica simulator playing in real time: it stops speaking well after the last chunk is
    sent (the worker sends at twice real time, see ``FAST_SEND``), as a replica would."""
    with running_simulator(redis_client, tmp_path / "sim", speed=1.0) as sim:
        yield sim


@pytest.fixture
def flower(redis_client: redis.Redis, tmp_path: Path) -> Iterator[Flower]:
    with run_flower(tmp_path) as f:
        yield f


def chirp_wav(path: Path, seconds: float, rate: int = 24000) -> Path:
    """A mono 16-bit rising tone."""
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * 32767 * np.sin(2 * np.pi * (300 + 200 * t) * t)).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return path


def audio_fragments(client: redis.Redis, room: str) -> set[str]:
    """A 24-character piece of every audio chunk's base64 that went into the room."""
    return {m["properties"]["audio"][:24] for m in wire(client, room)
            if m["event_type"] == "conversation.echo" and m["properties"]["modality"] == "audio"}


def assert_clean(text: str, where: str, *payloads: str, fragments: Collection[str] = ()) -> None:
    """No secret, no utterance text, no piece of audio in ``text``."""
    for needle in (SECRET, *payloads):
        assert needle not in text, f"{where} contains {needle!r}"
    leaked = [f for f in fragments if f in text]
    assert not leaked, f"{where} contains base64 audio ({len(leaked)} chunks)"


# Flower -------------------------------------------------------------------------------------


def test_flower_shows_echoq_tasks_with_ids_only_a_sending_state_with_chunks_workers_and_queues(
    workers: Workers, simulator: Any, client: Any, flower: Flower, redis_client: redis.Redis, tmp_path: Path
) -> None:
    text = "Flower must never show this sentence."
    (worker,) = workers.start(1, TAVUS_API_KEY=SECRET, **PACED)
    client.open("conv-fl", "loopback://room-fl")
    said = client.say("conv-fl", text)
    played = client.play("conv-fl", chirp_wav(tmp_path / "chirp.wav", 3.0))

    # while the clip is being sent its drain task is SENDING, with chunks sent / total
    def sending() -> tuple[str, str] | None:
        for task_id, task in flower.api("/api/tasks", state="SENDING").items():
            if f"chunks, {played[:8]}" in str(task["result"]):
                return task_id, str(task["result"])
        return None

    task_id, progress = wait_for(sending, 30, what="a SENDING task in Flower")
    # short, count first (Flower's table cuts long results): "12/~75 chunks, 3f2a9c1e", ~ while estimated
    m = re.fullmatch(rf"(\d+)/(~?)(\d+) chunks, {played[:8]}", progress)
    assert m and 0 < int(m.group(1)) <= int(m.group(3)) == 75, progress
    assert (m.group(2) == "~") == (int(m.group(1)) < 75), progress
    # the result backend holds the same state with its meta (Flower's /api/task/result shows the state)
    assert flower.api(f"/api/task/result/{task_id}")["state"] in ("SENDING", "SUCCESS")
    stored = AsyncResult(task_id, app=celery_app)
    if stored.state == "SENDING":
        info = stored.info
        assert info["utterance_id"] == played and 75 in (info["chunks_estimate"], info["chunks_total"]), info

    assert client.wait(played, timeout=30)["state"] in ("sent", "spoken")
    assert client.wait(said, timeout=30)["state"] in ("sent", "spoken")
    done = wait_for(lambda: (t := flower.api(f"/api/task/info/{task_id}"))["state"] == "SUCCESS" and t, 20,
                    what="the drain task to succeed in Flower")
    assert done["name"] == "echoq.drain" and done["worker"] == worker.name
    assert re.fullmatch(r"\{'conversation_id': 'conv-fl', 'utterances': [12]\}", done["result"]), done["result"]
    # the result backend ends in SUCCESS too, not in the last progress report
    assert wait_for(lambda: flower.api(f"/api/task/result/{task_id}")["state"] == "SUCCESS", 10,
                    what="the stored result to say SUCCESS")

    # every task is echoq.<something>, and its arguments are the conversation id and nothing else
    tasks_raw = flower.get("/api/tasks").text
    tasks = json.loads(tasks_raw)
    names = {t["name"] for t in tasks.values()}
    assert {"echoq.open", "echoq.drain"} <= names and all(n.startswith("echoq.") for n in names), names
    assert all(n.startswith("echoq.") for n in flower.api("/api/task/types")["task-types"])
    assert {(t["args"], t["kwargs"]) for t in tasks.values()} == {("['conv-fl']", "{}")}

    # the worker, with the conversation's queue among the queues it consumes
    def worker_info() -> dict[str, Any] | None:
        info = flower.api("/api/workers", refresh=1).get(worker.name)
        return info if info and info.get("active_queues") else None

    info = wait_for(worker_info, 20, what="the worker in Flower")
    consumed = {q["name"] for q in info["active_queues"]}
    assert {"echoq.control", "echoq.conv.conv-fl"} <= consumed
    lengths = {q["name"]: q["messages"] for q in flower.api("/api/queues/length")["active_queues"]}
    assert {"echoq.control", "echoq.conv.conv-fl"} <= set(lengths) and all(n >= 0 for n in lengths.values())
    broker_page = flower.get("/broker").text
    assert "echoq.conv.conv-fl" in broker_page

    fragments = audio_fragments(redis_client, "room-fl")
    assert fragments
    workers_raw = flower.get("/api/workers").text
    task_page = flower.get(f"/task/{task_id}").text
    for where, body in (("/api/tasks", tasks_raw), ("/api/workers", workers_raw), ("/broker", broker_page),
                        ("/task/<id>", task_page), ("flower's log", flower.log())):
        assert_clean(body, where, text, fragments=fragments)


# metrics and logs ----------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample on a worker's ``/metrics``: (name, sorted labels) -> value."""
    body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def json_steps(log: str) -> dict[str, list[dict[str, Any]]]:
    """The worker's JSON step lines, by step name (Celery's own text lines are skipped)."""
    steps: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in log.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if "step" in record:
                steps[record["step"]].append(record)
    return steps


def one(steps: dict[str, list[dict[str, Any]]], name: str, **match: Any) -> dict[str, Any]:
    found = [r for r in steps.get(name, []) if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, f"{name} {match}: {len(found)} lines; {dict(steps)}"
    return found[0]


class Lines(logging.Handler):
    """Keeps the JSON lines logged in this process (the producer's side)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_metrics_and_json_logs_show_every_step_with_ids_and_never_text_audio_or_secrets(
    workers: Workers, realtime_simulator: Simulator, client: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    producer_log = Lines()
    producer_logger = logging.getLogger("echoq.producer")
    producer_logger.addHandler(producer_log)
    producer_logger.setLevel(logging.INFO)
    try:
        _speak_and_check(workers, client, redis_client, tmp_path, producer_log)
    finally:
        producer_logger.removeHandler(producer_log)


def _speak_and_check(workers: Workers, client: Any, redis_client: redis.Redis, tmp_path: Path,
                     producer_log: Lines) -> None:
    port = free_port()
    (worker,) = workers.start(1, ECHOQ_METRICS_PORT=str(port), ECHOQ_LOG_JSON="true", TAVUS_API_KEY=SECRET,
                              **FAST_SEND)
    before = scrape(port)
    assert value(before, "echoq_sessions_held") == 0

    lines = ["The first line of a scripted speech.", "A second line, said after the clip."]
    client.open("conv-o", "loopback://room-o")
    wait_for(lambda: value(scrape(port), "echoq_sessions_held") == 1, 20, what="echoq_sessions_held to reach 1")

    # text + audio + text, each spoken by the replica
    said = client.say("conv-o", lines[0])
    clip = client.play("conv-o", chirp_wav(tmp_path / "short.wav", 0.5))
    said2 = client.say("conv-o", lines[1])
    for uid in (said, clip, said2):
        assert client.wait(uid, timeout=30, states=("spoken",))["state"] == "spoken"

    # an utterance interrupted mid-way, with one queued behind it (a backlog the supervisor reports)
    long = client.play("conv-o", chirp_wav(tmp_path / "long.wav", 3.0))
    queued = client.say("conv-o", "This line is cancelled before it is sent.")
    wait_for(lambda: value(scrape(port), "echoq_backlog", conversation_id="conv-o") >= 1, 20,
             what="echoq_backlog to show the queued utterances")
    wait_for(lambda: client.status(long).get("chunks_sent", 0) > 0 or
             any(m["properties"].get("inference_id") == long for m in wire(redis_client, "room-o")), 20,
             what="the long clip to start")
    client.interrupt("conv-o")
    assert client.wait(long, timeout=20, states=("interrupted",))["state"] == "interrupted"
    assert client.status(queued)["state"] == "cancelled"

    # one that fails in the worker: bytes no decoder reads (the client refuses them up front)
    Store(redis_client).enqueue(
        "conv-o", {"utterance_id": "broken", "kind": "audio", "inference_id": "broken", "sample_rate": 24000},
        {"id": "broken", "conversation_id": "conv-o", "inference_id": "broken", "kind": "audio"},
        blob=b"\x00not audio" * 64)
    assert client.wait("broken", timeout=20, states=("failed",))["error"]
    wait_for(lambda: value(scrape(port), "echoq_backlog", conversation_id="conv-o") == 0, 20,
             what="echoq_backlog back to 0")

    after = scrape(port)
    fragments = audio_fragments(redis_client, "room-o")
    assert fragments

    # metrics moved
    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("echoq_utterances_total", state="sent") >= 3
    assert moved("echoq_utterances_total", state="spoken") >= 3
    assert moved("echoq_utterances_total", state="interrupted") == 1
    assert moved("echoq_utterances_total", state="failed") == 1
    audio_messages = sum(1 for m in wire(redis_client, "room-o") if m["event_type"] == "conversation.echo"
                         and m["properties"]["modality"] == "audio")
    assert moved("echoq_messages_sent_total", kind="text") == 2
    assert moved("echoq_messages_sent_total", kind="audio") == audio_messages
    assert moved("echoq_messages_sent_total", kind="interrupt") == 1
    assert moved("echoq_send_seconds_count") == 2 + audio_messages + 1
    assert moved("echoq_send_seconds_sum") > 0
    assert moved("echoq_first_audio_seconds_count") >= 4  # every utterance enqueued by the client
    assert value(after, "echoq_sessions_held") == 1
    metrics_text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert_clean(metrics_text, "/metrics", *lines, fragments=fragments)

    # a warm shutdown leaves the room
    assert worker.stop(timeout=60) == 0
    log = worker.log()
    steps = json_steps(log)
    cid, name = "conv-o", worker.name
    one(steps, "conversation.taken", conversation=cid, worker=name)
    assert one(steps, "room.joined", conversation=cid, worker=name)["ms"] >= 0
    for uid, kind in ((said, "text"), (clip, "audio"), (said2, "text"), (long, "audio"), ("broken", "audio")):
        one(steps, "utterance.started", conversation=cid, utterance=uid, kind=kind)
    assert one(steps, "utterance.sent", conversation=cid, utterance=said)["messages"] == 1
    sent_clip = one(steps, "utterance.sent", conversation=cid, utterance=clip)
    assert sent_clip["messages"] > 1 and sent_clip["ms"] >= 0
    for uid in (said, clip, said2):
        assert one(steps, "utterance.spoken", conversation=cid, utterance=uid, interrupted=False)["duration"] > 0
    one(steps, "utterance.interrupted", conversation=cid, utterance=long)
    one(steps, "interrupt.sent", conversation=cid)
    assert one(steps, "utterance.failed", conversation=cid, utterance="broken")["reason"]
    one(steps, "room.left", conversation=cid, worker=name, reason="worker shutdown")
    # the objects alive at start are out of the collector's reach (ECHOQ_GC_FREEZE's default)
    assert one(steps, "gc.ready")["frozen"] > 10_000
    assert "echoq_gc_pause_seconds_bucket" in metrics_text  # served, for dashboards
    assert not [s for s in steps if s.startswith("utterance.") and s not in (
        "utterance.started", "utterance.sent", "utterance.spoken", "utterance.interrupted", "utterance.failed")]
    assert_clean(log, "the worker's log", *lines, "cancelled before it is sent", fragments=fragments)

    # the producer's side: one line per enqueue, with ids
    enqueued = [json.loads(line) for line in producer_log.lines]
    assert [(r["step"], r["utterance"]) for r in enqueued] == [
        ("utterance.enqueued", uid) for uid in (said, clip, said2, long, queued)]
    assert all(r["conversation"] == cid and r["seq"] >= 1 for r in enqueued)
    assert_clean("\n".join(producer_log.lines), "the producer's log", *lines, fragments=fragments)
    assert base64.b64encode(lines[0].encode()).decode()[:16] not in log
