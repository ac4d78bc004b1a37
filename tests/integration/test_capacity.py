"""Capacity is visible: a conversation no worker can take says so, and is served once one has room."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import redis

from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import ROOT, Workers, wait_for, wire
from tests.integration.test_api import Api, api, serve, sse_events  # noqa: F401  (fixtures)
from tests.integration.test_flower_browser import free_port
from tests.integration.test_observability import scrape, value
from worker import capacity, keys

pytestmark = pytest.mark.redis


def event_types(client: Any, cid: str) -> list[str]:
    return [e["type"] for _id, e in client.events(cid)]


def texts(client: redis.Redis, room: str) -> list[str]:
    return [m["properties"]["text"] for m in wire(client, room) if m["event_type"] == "conversation.echo"]


def test_a_conversation_beyond_every_workers_limit_waits_visibly_and_is_served_when_one_closes(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, api: Api  # noqa: F811
) -> None:
    port = free_port()
    (worker,) = workers.start(1, ECHOQ_MAX_SESSIONS="2", ECHOQ_METRICS_PORT=str(port))
    for n in (1, 2):
        client.open(f"cap-{n}", f"loopback://cap-room-{n}")
        wait_for(lambda n=n: client.conversation(f"cap-{n}")["owner"], 20, what=f"cap-{n} to be taken")
    # the worker says it is full at its next scan
    wait_for(lambda: capacity.fleet(redis_client, client.settings).free == 0, 10, what="the full worker's heartbeat")
    third = client.open("cap-3", "loopback://cap-room-3")
    assert third["waiting"] == capacity.REASON_FULL  # open says so at once
    uid = client.say("cap-3", "after a wait")

    shown = client.conversation("cap-3")
    assert shown["owner"] is None and shown["waiting"] == capacity.REASON_FULL
    r = api.http.get("/v1/conversations/cap-3")
    assert r.status_code == 200 and r.json()["waiting"] == capacity.REASON_FULL
    with api.http.stream("GET", "/v1/conversations/cap-3/events", params={"limit": 2}) as resp:
        streamed = [e for _id, e in sse_events(resp, 2)]
    assert [e["type"] for e in streamed] == ["conversation.opened", "conversation.waiting"]
    assert streamed[1]["reason"] == capacity.REASON_FULL
    wait_for(lambda: value(scrape(port), "echoq_conversations_waiting") == 1.0, 20, what="the waiting metric")
    assert client.status(uid)["state"] == "queued"
    assert event_types(client, "cap-3").count("conversation.waiting") == 1  # said once, not every scan

    client.close("cap-1")  # a slot frees: the waiting conversation is taken and its line spoken
    client.wait(uid, timeout=30, states=("sent", "spoken"))
    assert texts(redis_client, "cap-room-3") == ["after a wait"]
    shown = client.conversation("cap-3")
    assert shown["owner"] == worker.name and shown["waiting"] is None
    types = event_types(client, "cap-3")
    assert types.index("conversation.waiting") < types.index("conversation.joined")
    wait_for(lambda: value(scrape(port), "echoq_conversations_waiting") == 0.0, 20, what="the metric back at 0")


def test_open_warns_when_no_worker_runs(client: Any, redis_client: redis.Redis) -> None:
    env = {**os.environ, "ECHOQ_REDIS_URL": TEST_REDIS_URL}
    done = subprocess.run([sys.executable, "-m", "producer.cli", "open", "lonely", "--url",
                           "loopback://lonely-room"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"waits for a worker: {capacity.REASON_NO_WORKER}" in done.stderr
    assert client.conversation("lonely")["waiting"] == capacity.REASON_NO_WORKER
    assert "conversation.waiting" in event_types(client, "lonely")


def test_realtime_pacing_on_threads_limits_a_worker_to_its_threads_less_two_and_publishes_that_limit(
    workers: Workers, redis_client: redis.Redis
) -> None:
    import json

    (worker,) = workers.start(1, ECHOQ_PACING="realtime", ECHOQ_PACING_LOOP="false",
                              ECHOQ_MAX_SESSIONS="50")  # started with -c 6
    beat = json.loads(redis_client.hget(keys.WORKERS, worker.name) or b"{}")
    assert beat["max_sessions"] == 6 - capacity.CONTROL_THREADS and beat["threads"] == 6
