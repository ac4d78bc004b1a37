"""Script runs end to end: a run that creates its Tavus conversation, a detached run, and the
missed-firing policy of schedules. Real worker processes, the simulator, the test Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.scripting.beat import REDBEAT_PREFIX_ENV, TASK_FIRE
from tests.conftest import TEST_REDIS_URL
from tests.fake_tavus import FakeTavus
from tests.integration.conftest import ROOT, Workers, wait_for, wire
from worker import keys

pytestmark = pytest.mark.redis


@pytest.fixture
def tavus() -> Iterator[FakeTavus]:
    """A fake Tavus whose conversations are loopback rooms, so workers can deliver into them."""
    with FakeTavus(conversation_url="loopback://{conversation_id}") as fake:
        yield fake


def echoq(*argv: str, prefix: str, tavus: FakeTavus | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the ``echoq`` CLI in a child process on the test database (and the fake Tavus)."""
    env = {**os.environ, "ECHOQ_REDIS_URL": TEST_REDIS_URL, REDBEAT_PREFIX_ENV: prefix}
    env.pop("ECHOQ_TAVUS_API_KEY", None)
    if tavus is not None:
        env.update(TAVUS_API_KEY=tavus.api_key, ECHOQ_TAVUS_BASE_URL=tavus.url)
    return subprocess.run([sys.executable, "-m", "producer.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def echo_texts(client: redis.Redis, room: str) -> list[tuple[str, str]]:
    """(inference id, text) of every text echo sent into a loopback room, in order."""
    return [(m["properties"]["inference_id"], m["properties"].get("text", "")) for m in wire(client, room)
            if m["event_type"] == "conversation.echo"]


def simulator_heard(sim: Any, room: str) -> list[str]:
    """Inference ids the simulator received in a room, in arrival order, once each finished playing."""
    utts = sim.report()["rooms"].get(room, {}).get("utterances", [])
    return [u["inference_id"] for u in utts if u["done"]]


def run_status(run_id: str) -> dict[str, Any]:
    """A run as ``echoq script status`` reports it."""
    from producer.scripting.runs import Runner

    status = Runner(redis.Redis.from_url(TEST_REDIS_URL)).status(run_id)
    assert status is not None, run_id
    return status


# a target created on Tavus at run time ----------------------------------------------------------


def test_a_run_creates_its_tavus_conversation_opens_it_and_speaks_in_order(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, tavus: FakeTavus, prefix: str,
    tmp_path: Path,
) -> None:
    workers.start(1, **{REDBEAT_PREFIX_ENV: prefix})
    persona = tavus.add_persona("Announcer", pipeline_mode="echo")
    path = tmp_path / "announce.yaml"
    path.write_text(f"conversation:\n  persona_id: {persona['persona_id']}\n  replica_id: r-test\n"
                    "  name: Morning announcement\n"
                    "lines:\n  - text: first line\n  - text: second line\n    pause: 200ms\n  - text: third line\n")

    done = echoq("script", "run", str(path), "--json", "--timeout", "40", prefix=prefix, tavus=tavus)

    assert done.returncode == 0, done.stdout + done.stderr
    posts = tavus.requests("POST", "/v2/conversations")
    assert len(posts) == 1
    assert posts[0].body["persona_id"] == persona["persona_id"]
    assert posts[0].body["replica_id"] == "r-test"
    assert posts[0].body["conversation_name"] == "Morning announcement"
    (conv_id,) = tavus.state.conversations
    conv = client.conversation(conv_id)
    assert conv["state"] == "open" and conv["url"] == f"loopback://{conv_id}"

    run = json.loads(done.stdout)
    assert run["state"] == "done" and run["conversation_id"] == conv_id
    uids = [ln["utterance_id"] for ln in run["lines"]]
    assert uids == [f"{run['id']}:{n}" for n in (1, 2, 3)]
    assert all(ln["state"] in ("sent", "spoken") for ln in run["lines"]), run["lines"]
    assert echo_texts(redis_client, conv_id) == list(zip(uids, ["first line", "second line", "third line"],
                                                         strict=True))
    heard = wait_for(lambda: (h := simulator_heard(simulator, conv_id)) and len(h) == 3 and h, 20,
                     what="the simulator to play all three lines")
    assert heard == uids
    assert simulator.report()["rooms"][conv_id]["violations"] == []


def test_tavus_refusing_the_conversation_fails_the_run_and_sends_nothing(
    redis_client: redis.Redis, tavus: FakeTavus, prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "refused.yaml"
    path.write_text("conversation: {persona_id: p-gone, replica_id: r-test}\nlines:\n  - text: never said\n")
    tavus.reject(status=404, message="Persona not found")

    done = echoq("script", "run", str(path), "--timeout", "20", prefix=prefix, tavus=tavus)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert "failed: could not create the conversation" in last and "HTTP 404" in last
    assert "Persona not found" in last, last
    assert tavus.api_key not in done.stdout + done.stderr
    assert len(tavus.requests("POST", "/v2/conversations")) == 1
    assert tavus.state.conversations == {}
    assert not redis_client.smembers(keys.CONVERSATIONS)
    assert not redis_client.smembers(keys.LOOPBACK_ROOMS)
    assert not list(redis_client.scan_iter(keys.utterance("*")))
    run_id = last.split()[1]
    run = run_status(run_id)
    assert run["state"] == "failed" and [ln["state"] for ln in run["lines"]] == ["pending"]


# a detached run --------------------------------------------------------------------------------


def test_a_detached_run_returns_its_id_and_status_shows_every_line_in_order(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, prefix: str, tmp_path: Path
) -> None:
    workers.start(1, **{REDBEAT_PREFIX_ENV: prefix})
    client.open("conv-detached", "loopback://room-detached")
    path = tmp_path / "detached.yaml"
    # the pause is kept by the workers' pumps: the CLI that started the run has gone by then
    path.write_text("conversation: conv-detached\nlines:\n  - text: one\n    pause: 300ms\n"
                    "  - text: two\n  - text: three\n")

    started = echoq("script", "run", str(path), "--detach", prefix=prefix)

    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    assert run_id.startswith("run:") and "\n" not in run_id
    wait_for(lambda: run_status(run_id)["state"] == "done"
             and all(ln["state"] == "spoken" for ln in run_status(run_id)["lines"]), 30,
             what="every line of the detached run to be spoken")

    shown = echoq("script", "status", run_id, "--json", prefix=prefix)

    assert shown.returncode == 0, shown.stderr
    run = json.loads(shown.stdout)
    assert run["id"] == run_id and run["state"] == "done" and run["error"] is None
    lines = run["lines"]
    assert [ln["n"] for ln in lines] == [1, 2, 3]
    assert [ln["utterance_id"] for ln in lines] == [f"{run_id}:{n}" for n in (1, 2, 3)]
    assert [ln["state"] for ln in lines] == ["spoken"] * 3
    sent = [ln["sent_at"] for ln in lines]
    assert sent == sorted(sent)
    assert all(ln["sent_at"] <= ln["spoken_at"] for ln in lines)
    assert echo_texts(redis_client, "room-detached") == [(f"{run_id}:{n}", t) for n, t in
                                                         ((1, "one"), (2, "two"), (3, "three"))]
    assert simulator_heard(simulator, "room-detached") == [f"{run_id}:{n}" for n in (1, 2, 3)]


def test_status_of_an_unknown_run_exits_3(redis_client: redis.Redis, prefix: str) -> None:
    done = echoq("script", "status", "run:nosuchrun", "--json", prefix=prefix)
    assert done.returncode == 3
    assert "no run 'run:nosuchrun'" in done.stderr


# missed firings --------------------------------------------------------------------------------

EVERY_S = 10


@pytest.fixture
def store(redis_client: redis.Redis, prefix: str) -> Any:
    from producer.scripting.schedules import Schedules

    return Schedules(redis.Redis.from_url(TEST_REDIS_URL))


def backdated(store: Any, schedule_id: str, conversation: str, *, grace: str | None = None) -> float:
    """An ``every 10s`` schedule that has existed for an hour (beat never ran); returns its anchor."""
    store.add({"conversation": conversation, "lines": [{"text": f"{schedule_id} one"}, {"text": f"{schedule_id} two"}]},
              every=f"{EVERY_S}s", schedule_id=schedule_id, grace=grace)
    rec = store._load(schedule_id)
    hour_ago = rec["anchor"] - 3600
    rec.update(anchor=hour_ago, not_before=hour_ago, created_at=hour_ago, updated_at=hour_ago)
    store._save(rec)
    return float(hour_ago)


def slot_back(anchor: float, intervals: int) -> tuple[str, float]:
    """The slot ``intervals`` before the latest one (id and time): at least ``intervals * 10`` s late."""
    from producer.scripting.timing import latest_slot, parse_timing, slot_id

    latest = latest_slot(parse_timing(every=EVERY_S), anchor, datetime.now(UTC))
    assert latest is not None
    slot = latest - timedelta(seconds=intervals * EVERY_S)
    return slot_id(slot), slot.timestamp()


def fire(schedule_id: str, slot: str) -> None:
    """Publish a firing of one slot, as beat would after being down."""
    from worker.celery_app import app

    app.send_task(TASK_FIRE, args=[schedule_id, slot], queue=keys.CONTROL_QUEUE)


def run_of(store: Any, schedule_id: str, run_id: str, states: tuple[str, ...]) -> dict[str, Any] | None:
    return next((r for r in store.history(schedule_id, limit=10) if r["id"] == run_id and r["state"] in states),
                None)


def test_a_missed_firing_past_grace_is_skipped_and_one_within_grace_runs_late(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, store: Any, prefix: str
) -> None:
    # the default grace window comes from the workers' environment; a schedule's own overrides it
    workers.start(1, **{REDBEAT_PREFIX_ENV: prefix, "ECHOQ_SCHEDULE_GRACE_S": "45"})
    client.open("conv-m", "loopback://room-m")
    anchor = backdated(store, "missed", "conv-m")
    lenient = backdated(store, "lenient", "conv-m", grace="2m")

    # 50-60 s late: past the 45 s default (it would still run under the built-in 60 s)
    too_late, too_late_at = slot_back(anchor, 5)
    fire("missed", too_late)
    skipped = wait_for(lambda: run_of(store, "missed", f"sch:missed:{too_late}", ("skipped",)), 20,
                       what="the firing past its grace window to be recorded")
    assert skipped["slot"] == too_late_at and skipped["late_s"] > 45
    assert skipped["lines"] == [] and skipped["error"].startswith("missed:") and "grace 45s" in skipped["error"]

    # 20-30 s late: within the window, it runs, and says how late
    in_time, in_time_at = slot_back(anchor, 2)
    fire("missed", in_time)
    ran = wait_for(lambda: run_of(store, "missed", f"sch:missed:{in_time}", ("done", "failed")), 30,
                   what="the late firing within grace to run")
    assert ran["state"] == "done", ran
    assert ran["slot"] == in_time_at and 2 * EVERY_S <= ran["late_s"] <= 45 + 1

    # the schedule's own grace (2 min) lets a 50-60 s late firing run
    own, _ = slot_back(lenient, 5)
    fire("lenient", own)
    ran_own = wait_for(lambda: run_of(store, "lenient", f"sch:lenient:{own}", ("done", "failed")), 30,
                       what="the firing within the schedule's own grace to run")
    assert ran_own["state"] == "done" and ran_own["late_s"] >= 5 * EVERY_S

    history = store.history("missed")
    assert [r["state"] for r in history] == ["done", "skipped"]  # newest slot first
    assert store.get("missed")["last_run"]["id"] == f"sch:missed:{in_time}"
    spoken = [ln["utterance_id"] for r in (ran, ran_own) for ln in r["lines"]]
    assert [iid for iid, _ in echo_texts(redis_client, "room-m")] == spoken
    assert not any(iid.startswith(f"sch:missed:{too_late}") for iid, _ in echo_texts(redis_client, "room-m"))
    assert client.store.utterance(f"sch:missed:{too_late}:1") is None
    assert client.conversation("conv-m")["utterances"] == 4
