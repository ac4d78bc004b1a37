"""Leases held, and lost, by one worker's supervisor while many of its rooms are left slowly.

One session manager in this process (the worker's supervisor, its real Celery app and Redis)
holds ``--sessions`` loopback conversations. Every broadcast that cancels a queue's consumer
(the first step of leaving a room) is made to take ``--drop-s`` seconds, as with a slow broker.
After two seconds another "worker" takes ``--stolen`` of the leases; from then on it also takes
any lease of these conversations that it finds free, as the rest of a fleet would. The script
prints, every second: sessions the manager holds, leases it holds in Redis, ``lease.lost`` so
far, leases taken by the other worker beyond the stolen ones (collateral), and rooms still being
left. Figures only; nothing is asserted.

    ECHOQ_BENCH_REDIS_URL=redis://127.0.0.1:6379/3 .venv/bin/python scripts/measure_supervision.py

The database is flushed first.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

URL = os.environ.get("ECHOQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
os.environ["ECHOQ_REDIS_URL"] = URL  # before any echoq module reads its settings
os.environ.pop("ECHOQ_BROKER_URL", None)

import redis  # noqa: E402

from worker import keys  # noqa: E402
from worker.celery_app import app  # noqa: E402
from worker.sessions import SessionManager  # noqa: E402
from worker.settings import Settings  # noqa: E402

THIEF = "elsewhere@fleet"


class Count(logging.Handler):
    def __init__(self, step: str) -> None:
        super().__init__()
        self.step = step
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.step):
            self.n += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=150)
    ap.add_argument("--stolen", type=int, default=100)
    ap.add_argument("--drop-s", type=float, default=5.0, help="how long each cancel_consumer broadcast takes")
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--lease-ttl", type=float, default=3.0)
    ap.add_argument("--scan", type=float, default=0.25)
    args = ap.parse_args()

    client = redis.Redis.from_url(URL)
    client.flushdb()
    settings = Settings(_env_file=None, redis_url=URL, lease_ttl_s=args.lease_ttl,  # type: ignore[call-arg]
                        scan_interval_s=args.scan, max_sessions=args.sessions, shed_late_fraction=0,
                        shed_late_chunks=0)
    mgr = SessionManager(app, settings, client, hostname="measured@localhost", threads=8)
    cids = [f"m-{n:04d}" for n in range(args.sessions)]
    for cid in cids:
        mgr.store.open_conversation(cid, f"loopback://{cid}?replica=0")
        if mgr.adopt(cid) is None:
            raise SystemExit(f"{cid} could not be adopted")
    cancel = app.control.cancel_consumer

    def slow_cancel(queue: str, **kwargs: Any) -> Any:
        time.sleep(args.drop_s)
        return cancel(queue, **kwargs)

    app.control.cancel_consumer = slow_cancel  # type: ignore[method-assign]
    lost = Count("lease.lost")
    logging.getLogger("echoq").addHandler(lost)
    logging.getLogger("echoq").setLevel(logging.INFO)
    mgr.start()

    stolen = set(cids[: args.stolen])
    stop = threading.Event()

    def fleet() -> None:
        """The rest of the fleet: takes the stolen leases, then any that it finds free."""
        for cid in stolen:
            client.set(keys.lease(cid), f"{THIEF}:x", px=600_000)
        while not stop.wait(args.scan):
            for cid in cids:
                client.set(keys.lease(cid), f"{THIEF}:x", px=600_000, nx=True)

    tokens = {cid: s.token for cid, s in mgr.sessions.items()}
    print(f"# {args.sessions} sessions, {args.stolen} leases taken by another worker at t=2 s, every "
          f"cancel_consumer takes {args.drop_s:g} s; lease TTL {args.lease_ttl:g} s, scan {args.scan:g} s")
    print(f"# load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("t_s  held  leases_held  lease_lost  collateral  leaving")
    t0 = time.monotonic()
    thief: threading.Thread | None = None
    for second in range(args.seconds + 1):
        time.sleep(max(0.0, t0 + second - time.monotonic()))
        if second == 2:
            thief = threading.Thread(target=fleet, daemon=True)
            thief.start()
        pipe = client.pipeline(transaction=False)
        for cid in cids:
            pipe.get(keys.lease(cid))
        owners = dict(zip(cids, pipe.execute(), strict=True))
        mine = sum(1 for cid, v in owners.items() if v is not None and v.decode() == tokens[cid])
        collateral = sum(1 for cid, v in owners.items()
                         if cid not in stolen and v is not None and v.decode().startswith(THIEF))
        leaving = len(getattr(mgr, "_leaving", ()))
        print(f"{second:>3}  {len(mgr.sessions):>4}  {mine:>11}  {lost.n:>10}  {collateral:>10}  {leaving:>7}",
              flush=True)
    stop.set()
    print(f"# kept {args.sessions - args.stolen - collateral} of the {args.sessions - args.stolen} leases nobody stole; "
          f"lease.lost logged {lost.n} times ({args.stolen} leases were stolen); load average at the end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    sys.stdout.flush()
    os._exit(0)  # rooms still being left (slowly) are not waited for


if __name__ == "__main__":
    main()
