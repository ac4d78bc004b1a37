"""Schedules and script runs end to end: real beat (RedBeat) and worker processes, the simulator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.scripting.beat import REDBEAT_PREFIX_ENV, TASK_FIRE
from producer.scripting.schedules import TOLERANCE_S
from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import FAST_ENV, ROOT, WorkerProc, Workers, wait_for, wire
from worker import keys

pytestmark = pytest.mark.redis


class Beats:
    def __init__(self, tmp: Path, prefix: str) -> None:
        self.tmp, self.prefix, self.procs = tmp, prefix, []  # type: ignore[var-annotated]

    def start(self) -> WorkerProc:
        """A beat with the default interval and lock timeout (what the README and compose run)."""
        name = f"beat-{len(self.procs)}"
        log_path = self.tmp / f"{name}.log"
        env = {**os.environ, **FAST_ENV, "ECHOQ_REDIS_URL": TEST_REDIS_URL, REDBEAT_PREFIX_ENV: self.prefix}
        for setting in ("ECHOQ_BEAT_MAX_INTERVAL_S", "ECHOQ_BEAT_LOCK_TIMEOUT_S"):
            env.pop(setting, None)
        proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "beat"], cwd=ROOT,
                                env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
        beat = WorkerProc(name, proc, log_path)
        self.procs.append(beat)
        return beat

    def start_active_then_standby(self) -> tuple[WorkerProc, WorkerProc]:
        """Two beats: the first holds RedBeat's lock before the second starts and waits for it."""
        active = self.start()
        wait_for(lambda: "Acquired lock" in active.log() or active.proc.poll() is not None, 30,
                 what="the first beat to take the lock")
        assert active.proc.poll() is None, active.log()[-2000:]
        standby = self.start()
        wait_for(lambda: "beat: Starting" in standby.log() or standby.proc.poll() is not None, 30,
                 what="the second beat to start")
        assert "Acquired lock" not in standby.log()
        return active, standby


@pytest.fixture
def beats(redis_client: redis.Redis, tmp_path: Path, prefix: str) -> Iterator[Beats]:
    b = Beats(tmp_path, prefix)
    yield b
    for p in b.procs:
        p.stop()


@pytest.fixture
def store(redis_client: redis.Redis, prefix: str) -> Any:
    from producer.scripting.schedules import Schedules

    return Schedules(redis.Redis.from_url(TEST_REDIS_URL))


def script(conversation: str, *texts: str, pause: str | None = None) -> dict[str, Any]:
    lines: list[dict[str, Any]] = [{"text": t} for t in texts]
    if pause:
        lines[0]["pause"] = pause
    return {"conversation": conversation, "lines": lines}


def echo_ids(client: redis.Redis, room: str) -> list[str]:
    return [m["properties"]["inference_id"] for m in wire(client, room) if m["event_type"] == "conversation.echo"]


def finished_runs(store: Any, sid: str, n: int) -> list[dict[str, Any]]:
    runs = [r for r in store.history(sid, limit=100) if r["state"] == "done"]
    return runs if len(runs) >= n else []


def assert_each_run_spoken_once_in_order(runs: list[dict[str, Any]], ids_on_wire: list[str]) -> None:
    assert len(ids_on_wire) == len(set(ids_on_wire)), "an utterance went on the wire twice"
    for run in runs:
        uids = [ln["utterance_id"] for ln in run["lines"]]
        assert all(ln["state"] in ("sent", "spoken") for ln in run["lines"]), run
        positions = [ids_on_wire.index(u) for u in uids]
        assert positions == sorted(positions), f"lines of {run['id']} out of order"
        assert uids == [f"{run['id']}:{n}" for n in range(1, len(uids) + 1)]


def test_every_2s_fires_repeatedly_each_firing_once_in_order_with_two_schedulers(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, beats: Beats, store: Any,
    prefix: str,
) -> None:
    workers.start(1, **{REDBEAT_PREFIX_ENV: prefix})
    client.open("conv-s", "loopback://room-s")
    sid = store.add(script("conv-s", "first", "second"), every="2s", schedule_id="tick")["id"]
    first, second = beats.start_active_then_standby()
    runs = wait_for(lambda: finished_runs(store, sid, 2), 30, what="two firings")
    # hand over: the active scheduler stops, the waiting one takes the lock and fires on
    first.stop()
    before = len(runs)
    try:
        runs = wait_for(lambda: finished_runs(store, sid, before + 2), 45, what="firings after the hand-over")
    except pytest.fail.Exception:
        pytest.fail(f"no firings after the hand-over; the standby's log:\n{second.log()[-3000:]}")
    assert second.proc.poll() is None, second.log()[-2000:]
    slots = [r["slot"] for r in runs]
    assert len(slots) == len(set(slots))
    assert all((b - a) % 2 == 0 for a, b in zip(sorted(slots), sorted(slots)[1:], strict=False))
    assert_each_run_spoken_once_in_order(runs, echo_ids(redis_client, "room-s"))


def test_kill_9_of_the_active_beat_hands_over_with_default_settings_and_no_slot_speaks_twice(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, beats: Beats, store: Any,
    prefix: str,
) -> None:
    workers.start(1, **{REDBEAT_PREFIX_ENV: prefix})
    client.open("conv-k", "loopback://room-k")
    sid = store.add(script("conv-k", "one", "two"), every="2s", schedule_id="killed")["id"]
    active, standby = beats.start_active_then_standby()
    runs = wait_for(lambda: finished_runs(store, sid, 2), 30, what="two firings")
    active.proc.send_signal(signal.SIGKILL)  # no clean-up: its lock stays until it times out
    active.proc.wait(10)
    before = {r["slot"] for r in store.history(sid, limit=100)}
    # the default lock timeout is 5 s and the interval 1 s: a standby that took over fires the
    # next 2 s slots; the bound is generous for a busy machine (the figure is measured, not here)
    runs = wait_for(lambda: (r := finished_runs(store, sid, len(runs) + 3))
                    and len({x["slot"] for x in r} - before) >= 3 and r, 40,
                    what="three new firings after the kill")
    assert "Acquired lock" in standby.log() and standby.proc.poll() is None, standby.log()[-2000:]
    slots = [r["slot"] for r in runs]
    assert len(slots) == len(set(slots)), "a slot ran twice"
    assert_each_run_spoken_once_in_order(runs, echo_ids(redis_client, "room-k"))


def test_the_same_slot_fired_twice_speaks_once(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, store: Any, prefix: str
) -> None:
    from producer.scripting.timing import next_slot, parse_timing, slot_id
    from worker.celery_app import app

    workers.start(1, **{REDBEAT_PREFIX_ENV: prefix})
    client.open("conv-d", "loopback://room-d")
    rec = store.add(script("conv-d", "one", "two", "three"), every="1h", schedule_id="hourly")
    slot = slot_id(next_slot(parse_timing(every=3600), store._load("hourly")["anchor"], datetime.now(UTC)))
    # two publishes of one firing, as two schedulers or a retried publish would make them
    for _ in range(2):
        app.send_task(TASK_FIRE, args=[rec["id"], slot], queue=keys.CONTROL_QUEUE)
    assert store.fire(rec["id"], slot=slot)["action"] in ("started", "duplicate")
    runs = wait_for(lambda: finished_runs(store, "hourly", 1), 30, what="the firing")
    wait_for(lambda: len(echo_ids(redis_client, "room-d")) >= 3, 10, what="three lines on the wire")
    assert len(store.history("hourly")) == 1
    assert store.fire(rec["id"], slot=slot)["action"] == "duplicate"
    ids = echo_ids(redis_client, "room-d")
    assert ids == [f"sch:hourly:{slot}:{n}" for n in (1, 2, 3)]
    assert_each_run_spoken_once_in_order(runs, ids)


def test_edit_pause_resume_and_remove_apply_while_everything_runs(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, beats: Beats, store: Any,
    prefix: str,
) -> None:
    import time

    from worker.celery_app import app

    workers.start(1, **{REDBEAT_PREFIX_ENV: prefix})
    client.open("conv-e", "loopback://room-e")
    store.add(script("conv-e", "version one"), every="2s", schedule_id="edited")
    beats.start()

    def texts() -> list[str]:
        return [m["properties"].get("text", "") for m in wire(redis_client, "room-e")
                if m["event_type"] == "conversation.echo"]

    wait_for(lambda: "version one" in texts(), 30, what="the first version to be spoken")
    store.update("edited", script=script("conv-e", "version two"))
    wait_for(lambda: "version two" in texts(), 30, what="the edited script to be spoken")

    store.pause("edited")
    paused_at = time.time()
    assert store.get("edited")["state"] == "paused"
    assert store.fire("edited")["reason"] == "paused"
    # beat keeps running through more than one interval of the paused schedule beyond the
    # tolerance at each end, so the window checked below always holds a slot that must not fire
    time.sleep(2.5 + 2 * TOLERANCE_S)
    store.update("edited", script=script("conv-e", "version three"))
    store.resume("edited")
    resumed_at = time.time()
    wait_for(lambda: "version three" in texts(), 30, what="firings after resume")
    slots = [r["slot"] for r in store.history("edited", limit=100)]
    # a firing names the latest slot up to TOLERANCE_S ahead of it (clock skew), on both sides
    assert not [s for s in slots if paused_at + TOLERANCE_S < s < resumed_at - TOLERANCE_S], "a slot fired while paused"

    store.remove("edited")
    assert store.fire("edited")["action"] == "ignored"
    app.send_task(TASK_FIRE, args=["edited"], queue=keys.CONTROL_QUEUE)
    with pytest.raises(Exception, match="no schedule"):
        store.get("edited")
    assert not redis_client.exists(f"{prefix}echoq-schedule:edited")


def start_one_thread_worker(workers: Workers, prefix: str) -> WorkerProc:
    """A worker with a single thread: a pause that held it would stop every other delivery."""
    name = f"echoq-test-one-{uuid.uuid4().hex[:6]}@localhost"
    log_path = workers.tmp / "one-thread.log"
    env = {**os.environ, **FAST_ENV, "ECHOQ_REDIS_URL": TEST_REDIS_URL, REDBEAT_PREFIX_ENV: prefix}
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "-c", "1", "-n", name], cwd=ROOT,
                            env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    w = WorkerProc(name, proc, log_path)
    workers.started.append(w)
    wait_for(lambda: proc.poll() is not None or workers.client.hexists(keys.WORKERS, name), 30, what="the worker")
    assert proc.poll() is None, w.log()[-3000:]
    return w


def test_a_3s_pause_holds_no_worker_thread_and_lines_are_3s_apart(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, prefix: str, tmp_path: Path
) -> None:
    start_one_thread_worker(workers, prefix)
    client.open("conv-p", "loopback://room-p")
    client.open("conv-q", "loopback://room-q")
    path = tmp_path / "paused.yaml"
    path.write_text("conversation: conv-p\nlines:\n  - text: before the pause\n    pause: 3s\n"
                    "  - text: after the pause\n")
    env = {**os.environ, "ECHOQ_REDIS_URL": TEST_REDIS_URL, REDBEAT_PREFIX_ENV: prefix}
    cli = subprocess.Popen([sys.executable, "-m", "producer.cli", "script", "run", str(path), "--timeout", "40"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = wait_for(lambda: next((m for m in wire(redis_client, "room-p")), None), 30, what="line 1")
        run_id = first["properties"]["inference_id"].rsplit(":", 1)[0]
        # during the pause the worker's only thread is free: another conversation is served
        other = client.say("conv-q", "served during the pause")
        client.wait(other, timeout=20, states=("sent", "spoken"))
        second = client.store.utterance(f"{run_id}:2")
        assert second is None or second.get("sent_at") is None or \
            float(client.status(other)["sent_at"]) < float(second["sent_at"])
        out, _ = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, out
    assert "line 1/2 sent" in out and "line 2/2 sent" in out, out
    a, b = client.status(f"{run_id}:1"), client.status(f"{run_id}:2")
    assert float(b["sent_at"]) - float(a["sent_at"]) >= 3.0
    ids = echo_ids(redis_client, "room-p")
    assert ids == [f"{run_id}:1", f"{run_id}:2"]


def test_a_bad_script_is_rejected_before_anything_is_enqueued(
    client: Any, redis_client: redis.Redis, prefix: str, tmp_path: Path
) -> None:
    client.open("conv-b", "loopback://room-b")
    path = tmp_path / "bad.yaml"
    path.write_text("conversation: conv-b\nlines:\n  - text: fine\n  - text: also fine\n    pause: soon\n")
    env = {**os.environ, "ECHOQ_REDIS_URL": TEST_REDIS_URL, REDBEAT_PREFIX_ENV: prefix}
    done = subprocess.run([sys.executable, "-m", "producer.cli", "script", "run", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "line 2 (file line 5): pause:" in done.stderr  # the line of the field itself
    assert client.conversation("conv-b")["utterances"] == 0
    assert not list(redis_client.scan_iter("echoq:run:*"))


@pytest.mark.parametrize("timing", [["--cron", "0 0 30 2 *"], ["--at", "9999-12-31T23:00", "--tz", "America/New_York"]])
def test_a_timing_that_can_never_fire_is_refused_and_nothing_is_stored(
    client: Any, redis_client: redis.Redis, prefix: str, store: Any, tmp_path: Path, timing: list[str]
) -> None:
    client.open("conv-n", "loopback://room-n")
    path = tmp_path / "ok.yaml"
    path.write_text("conversation: conv-n\nlines:\n  - text: never\n")
    env = {**os.environ, "ECHOQ_REDIS_URL": TEST_REDIS_URL, REDBEAT_PREFIX_ENV: prefix}
    done = subprocess.run([sys.executable, "-m", "producer.cli", "schedule", "add", str(path), *timing], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "never fires" in done.stderr and "Traceback" not in done.stderr
    assert store.list() == []  # and listing still works
