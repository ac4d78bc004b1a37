"""Memory soak: open, use and close many conversations; Redis memory before, after, after expiry.

Starts a private redis-server on a free loopback port (so nobody else's keys count), one real
worker process with a short ``ECHOQ_RETENTION_S`` and the replica simulator, then runs
--conversations conversations, --parallel at a time: open a loopback room, say --lines lines
(every tenth conversation also plays a short clip), wait until each is sent, close, wait until
closed. It prints Redis ``used_memory`` and the key count at the start (worker and simulator
idle), right after the last close, once the retention has passed, and then without Celery's
stored task results (``celery-task-meta-*``, which expire after an hour on their own), plus what
kinds of key were left.

    .venv/bin/python scripts/soak_memory.py [--conversations 1000] [--retention 20]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import wave
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LEASE_TTL_S = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def private_redis() -> Iterator[tuple[str, Path]]:
    """A throwaway redis-server on a free loopback port: ``(url, its temp dir)``, gone afterwards."""
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server is not installed (scripts/setup.sh installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="echoq-script-"))
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                               "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    try:
        wait(lambda: _answers(redis.Redis.from_url(url)), 15, "the private redis-server")
        yield url, tmp
    finally:
        server.terminate()
        server.wait(15)
        shutil.rmtree(tmp, ignore_errors=True)


def memory(r: redis.Redis) -> tuple[int, int, int]:
    """``(used_memory, used_memory_dataset, keys)`` of the private server (bytes; the dataset is
    used_memory less the server's own overhead: clients, scripts, buffers)."""
    info: Any = r.info("memory")
    return int(info["used_memory"]), int(info["used_memory_dataset"]), int(r.dbsize())


def key_kinds(r: redis.Redis) -> Counter[str]:
    """Keys grouped by name with ids blurred, e.g. ``celery-task-meta-*``."""
    kinds: Counter[str] = Counter()
    for k in r.scan_iter(count=1000):
        name = k.decode(errors="replace")
        kinds[re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}|soak-[0-9]+|[0-9a-f]{32}", "*", name)] += 1
    return kinds


def clip(seconds: float) -> bytes:
    t = np.arange(int(seconds * 24000)) / 24000
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes((0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes())
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=1000)
    ap.add_argument("--parallel", type=int, default=20, help="conversations open at once")
    ap.add_argument("--lines", type=int, default=3, help="text lines said in each conversation")
    ap.add_argument("--retention", type=int, default=20, help="ECHOQ_RETENTION_S for the run (seconds)")
    args = ap.parse_args()
    with private_redis() as (url, tmp):
        return soak(args, url, tmp)


def soak(args: argparse.Namespace, url: str, tmp: Path) -> int:
    os.environ["ECHOQ_REDIS_URL"] = url
    os.environ["ECHOQ_RETENTION_S"] = str(args.retention)
    from producer.client import EchoqClient
    from worker import keys

    procs: list[subprocess.Popen[bytes]] = []
    try:
        r = redis.Redis.from_url(url)
        env = {**os.environ, "ECHOQ_LOG_LEVEL": "WARNING", "ECHOQ_SCAN_INTERVAL_S": "0.25", "ECHOQ_LEASE_TTL_S": str(LEASE_TTL_S),
               "ECHOQ_MAX_SESSIONS": str(args.parallel + 5), "ECHOQ_REPLICA_WAIT_TIMEOUT_S": "15"}
        worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "-c", "8", "-n", "soak@localhost"],
                                  cwd=ROOT, env=env, stdout=(tmp / "worker.log").open("wb"), stderr=subprocess.STDOUT)
        procs.append(worker)
        wait(lambda: r.hexists(keys.WORKERS, "soak@localhost") or worker.poll() is not None, 60, "the worker")
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited: see {tmp / 'worker.log'}")
        # its own process: in this one it would lag behind the producer threads
        sim = subprocess.Popen([sys.executable, "-m", "producer.cli", "simulate", "--out", str(tmp / "sim"),
                                "--speed", "50"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        procs.append(sim)
        wait(lambda: r.exists(keys.SIMULATOR_ALIVE), 30, "the simulator")
        time.sleep(2)
        before = memory(r)

        client = EchoqClient(url)
        audio = clip(0.2)
        t0 = time.monotonic()
        failed: list[str] = []

        def one(n: int) -> None:
            cid = f"soak-{n}"
            client.open(cid, f"loopback://{cid}")
            uids = [client.say(cid, f"line {i} of conversation {n}") for i in range(args.lines)]
            if n % 10 == 0:
                uids.append(client.play(cid, audio))
            for uid in uids:
                if client.wait(uid, timeout=120)["state"] not in ("sent", "spoken"):
                    failed.append(uid)
            client.close(cid)
            deadline = time.monotonic() + 60
            while client.conversation(cid)["state"] != "closed":
                if time.monotonic() > deadline:
                    failed.append(cid)
                    return
                time.sleep(0.05)

        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(one, range(args.conversations)))
        elapsed = time.monotonic() - t0
        after = memory(r)
        # past the retention and the owner's second pass (two lease TTLs after each close)
        time.sleep(max(args.retention, 2 * LEASE_TTL_S) + 2)
        expired = memory(r)
        while (now := memory(r))[2] < expired[2]:  # Redis expires keys a sample at a time
            expired = now
            time.sleep(2)
        left = key_kinds(r)
        # Celery's stored task results are not echoq's keys: they expire after result_expires
        results = list(r.scan_iter(match="celery-task-meta-*", count=1000))
        for i in range(0, len(results), 1000):
            r.delete(*results[i:i + 1000])
        without_results = memory(r)
        left_bytes = sum(int(r.memory_usage(k) or 0) for k in r.scan_iter(count=1000))

        mib = 1024 * 1024
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
              f"{platform.python_version()}, redis {r.info('server')['redis_version']}")
        print(f"conversations: {args.conversations} ({args.parallel} at a time, {args.lines} lines each, "
              f"every tenth with a 0.2 s clip) in {elapsed:.0f} s; failed: {len(failed)}")
        print(f"retention: {args.retention} s")
        for label, (used, dataset, count) in (("before", before), ("after closing", after), ("after expiry", expired),
                                     ("less results", without_results)):
            print(f"  {label:<14} used_memory {used / mib:7.2f} MiB  dataset {dataset / mib:6.2f} MiB  keys {count}")
        print(f"the {without_results[2]} keys left then hold {left_bytes / 1024:.1f} KiB (MEMORY USAGE)")
        print("keys left after expiry: " + ", ".join(f"{k} x{v}" for k, v in left.most_common()))
        return 1 if failed else 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _answers(r: redis.Redis) -> bool:
    try:
        return bool(r.ping())
    except redis.RedisError:
        return False


if __name__ == "__main__":
    sys.exit(main())
