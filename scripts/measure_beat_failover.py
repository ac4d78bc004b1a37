"""Scheduler failover: how long schedules stay silent when the active ``echoq beat`` dies or stops.

Starts a private redis-server on a free loopback port and two ``echoq beat`` processes with the
settings of the environment (the defaults unless ECHOQ_BEAT_* are set). A RedBeat entry of its
own fires every second (beat publishes the script pump only when a run is overdue, so the pump
cannot be the clock here); the active beat publishes it into ``echoq.control``, which nothing
consumes here, so each publish is one more message in that list. Each round stops the active beat — ``kill -9``
(its lock stays until it times out) or SIGTERM (it releases the lock) — and measures the time
from the signal to the standby's first publish; a fresh standby is then started for the next
round. Prints every round and the largest gap of each kind.

    .venv/bin/python scripts/measure_beat_failover.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.soak_memory import private_redis, wait  # noqa: E402


class Beat:
    def __init__(self, name: str, env: dict[str, str], tmp: Path) -> None:
        self.log_path = tmp / f"{name}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "beat"], cwd=ROOT, env=env,
                                     stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def holds_lock(self) -> bool:
        return "Acquired lock" in self.log()

    def started(self) -> bool:
        return "beat: Starting" in self.log()


def tick_every_second(url: str) -> None:
    """A RedBeat entry firing every second into the control queue: the clock the rounds watch."""
    from celery import Celery
    from celery.schedules import schedule
    from redbeat import RedBeatSchedulerEntry

    from producer.scripting.beat import configure_redbeat
    from worker import keys

    app = Celery("failover-measure", broker=url)
    configure_redbeat(app, url)
    RedBeatSchedulerEntry("failover-tick", "echoq.failover.tick", schedule(1.0), app=app,
                          options={"queue": keys.CONTROL_QUEUE, "expires": 30}).save()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each kind (kill -9, SIGTERM)")
    args = ap.parse_args()
    with private_redis() as (url, tmp):
        return measure(args, url, tmp)


def measure(args: argparse.Namespace, url: str, tmp: Path) -> int:
    from worker import keys
    from worker.settings import Settings

    beats: list[Beat] = []
    settings = Settings(redis_url=url)
    tick_every_second(url)
    try:
        r = redis.Redis.from_url(url)
        env = {**os.environ, "ECHOQ_REDIS_URL": url, "ECHOQ_LOG_LEVEL": "INFO"}

        def start() -> Beat:
            beats.append(Beat(f"beat-{len(beats)}", env, tmp))
            return beats[-1]

        active = start()
        wait(active.holds_lock, 30, "the first beat to take the lock")
        gaps: dict[str, list[float]] = {"kill -9": [], "SIGTERM": []}
        for kind in ["kill -9"] * args.rounds + ["SIGTERM"] * args.rounds:
            standby = start()
            wait(standby.started, 30, "the standby beat to start")
            wait(lambda: r.llen(keys.CONTROL_QUEUE) > 0, 10, "the active beat to publish")
            time.sleep(1.5)
            published = r.llen(keys.CONTROL_QUEUE)
            t0 = time.monotonic()
            active.proc.send_signal(signal.SIGKILL if kind == "kill -9" else signal.SIGTERM)
            active.proc.wait(30)
            # a publish already on its way when the signal came is not the standby's
            published = max(published, r.llen(keys.CONTROL_QUEUE))
            wait(lambda n=published: r.llen(keys.CONTROL_QUEUE) > n, 120, "the standby to publish")
            gap = time.monotonic() - t0
            assert standby.holds_lock(), standby.log()[-2000:]
            gaps[kind].append(gap)
            print(f"  {kind:<8} standby's first publish {gap:5.2f} s after the signal", flush=True)
            active = standby

        lock: Any = r.pttl(f"{os.environ.get('ECHOQ_REDBEAT_KEY_PREFIX') or 'echoq:redbeat:'}:lock")
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        print(f"settings: ECHOQ_BEAT_MAX_INTERVAL_S={settings.beat_max_interval_s:g} "
              f"ECHOQ_BEAT_LOCK_TIMEOUT_S={settings.beat_lock_timeout_s:g} (lock pttl now {lock} ms)")
        for kind, values in gaps.items():
            print(f"{kind}: worst {max(values):.2f} s, rounds " + ", ".join(f"{v:.2f}" for v in values))
        return 0
    finally:
        for beat in beats:
            if beat.proc.poll() is None:
                beat.proc.terminate()
                try:
                    beat.proc.wait(15)
                except subprocess.TimeoutExpired:
                    beat.proc.kill()


if __name__ == "__main__":
    sys.exit(main())
