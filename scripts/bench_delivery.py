"""Delivery benchmark: enqueue -> first message latency, and sustained messages per second.

Starts one real worker process on a dedicated Redis database (ECHOQ_BENCH_REDIS_URL, default
redis://127.0.0.1:6379/8, flushed first), opens loopback rooms that do not wait for a replica,
and measures:

1. enqueue -> first message in the room, text echo, with --conversations open: the time from
   just before ``EchoqClient.say`` returns-to-caller's start until a reader blocked on the room
   streams sees the message (p50 / p99 / max over --samples utterances, one at a time);
2. sustained messages per second of that one worker in burst pacing: --audio-seconds of audio
   per conversation on --burst-conversations conversations, first to last message on the wire;
3. the same two figures for direct ``LoopbackTransport.send`` calls with no queue in between,
   in the same run, and the ratios.

    .venv/bin/python scripts/bench_delivery.py [--samples 500] [--conversations 50]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH_URL = os.environ.get("ECHOQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
os.environ["ECHOQ_REDIS_URL"] = BENCH_URL

from producer.client import EchoqClient  # noqa: E402
from worker import audio, chunks, echo, keys  # noqa: E402
from worker.settings import get_settings  # noqa: E402
from worker.transports.loopback import LoopbackTransport  # noqa: E402


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class Arrivals:
    """A reader blocked on every room stream, noting when each message id first appears."""

    def __init__(self, r: redis.Redis, rooms: list[str]) -> None:
        self.r = redis.Redis.from_url(BENCH_URL)
        self.last = {keys.loopback_room(room): "$" for room in rooms}
        self.seen: dict[bytes, float] = {}
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            res = self.r.xread(self.last, block=100, count=1000)  # type: ignore[arg-type]
            now = time.perf_counter()
            for stream, entries in res or []:
                for eid, fields in entries:
                    self.last[stream.decode()] = eid.decode()
                    self.count += 1
                    data = fields[b"data"]
                    marker = data[data.find(b'"inference_id":"') + 16:].split(b'"', 1)[0]
                    self.seen.setdefault(marker, now)


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "-c", "8", "-n", "bench@localhost"],
                            cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def wait(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--conversations", type=int, default=50)
    ap.add_argument("--burst-conversations", type=int, default=4)
    ap.add_argument("--audio-seconds", type=float, default=40.0)
    args = ap.parse_args()

    r = redis.Redis.from_url(BENCH_URL)
    r.flushdb()
    s = get_settings()
    out = ROOT / "out" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ECHOQ_REDIS_URL": BENCH_URL, "ECHOQ_LOG_LEVEL": "WARNING", "ECHOQ_SCAN_INTERVAL_S": "0.5",
           "ECHOQ_MAX_SESSIONS": str(args.conversations + args.burst_conversations)}
    worker = start_worker(env, out / "worker.log")
    try:
        wait(lambda: r.hexists(keys.WORKERS, "bench@localhost"), 30, "the worker")
        client = EchoqClient(BENCH_URL)
        rooms = [f"bench-{i}" for i in range(args.conversations)]
        for i, room in enumerate(rooms):
            client.open(f"conv-{i}", f"loopback://{room}?replica=0")
        wait(lambda: all(r.exists(keys.lease(f"conv-{i}")) for i in range(len(rooms))), 60, "every room joined")
        time.sleep(1.5)  # let the worker's consumers pick up every conversation queue

        # 1. latency, one utterance at a time, round-robin over the open conversations
        arrivals = Arrivals(r, rooms)
        time.sleep(0.3)
        lat: list[float] = []
        for n in range(args.samples + 20):
            uid = f"lat-{n}"
            t0 = time.perf_counter()
            client.say(f"conv-{n % len(rooms)}", "Hello there!", utterance_id=uid)
            wait(lambda uid=uid: uid.encode() in arrivals.seen, 10, f"utterance {uid}")
            if n >= 20:  # the first few warm connections and code paths
                lat.append((arrivals.seen[uid.encode()] - t0) * 1000)
        enqueue_ms: list[float] = []
        for n in range(200):
            t0 = time.perf_counter()
            client.say(f"conv-{n % len(rooms)}", "x", utterance_id=f"enq-{n}")
            enqueue_ms.append((time.perf_counter() - t0) * 1000)
        arrivals.stop.set()

        # 2. sustained burst throughput of the one worker (audio chunks)
        clip = out / "burst.wav"
        t = np.arange(int(args.audio_seconds * 24000)) / 24000
        with wave.open(str(clip), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(24000)
            w.writeframes((0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes())
        burst_rooms = [f"burst-{i}" for i in range(args.burst_conversations)]
        for i, room in enumerate(burst_rooms):
            client.open(f"burst-{i}", f"loopback://{room}?replica=0")
        wait(lambda: all(r.exists(keys.lease(f"burst-{i}")) for i in range(len(burst_rooms))), 30, "burst rooms")
        time.sleep(1.5)
        ids = [client.play(f"burst-{i}", clip) for i in range(len(burst_rooms))]
        for uid in ids:
            client.wait(uid, timeout=300)
        first = min(int(r.xrange(keys.loopback_room(room), count=1)[0][0].split(b"-")[0]) for room in burst_rooms)
        last = max(int(r.xrevrange(keys.loopback_room(room), count=1)[0][0].split(b"-")[0]) for room in burst_rooms)
        total = sum(r.xlen(keys.loopback_room(room)) for room in burst_rooms)
        worker_rate = total / max(0.001, (last - first) / 1000)
    finally:
        worker.terminate()
        worker.wait(30)

    # 3. direct sends: no queue, no log, no cursor
    direct = LoopbackTransport("loopback://direct?replica=0", redis_client=r)
    direct.join(1)
    text_msg = echo.text_echo("c", "Hello there!", "direct", max_bytes=s.max_message_bytes)
    direct_lat = []
    for _ in range(args.samples):
        t0 = time.perf_counter()
        direct.send(text_msg)
        direct_lat.append((time.perf_counter() - t0) * 1000)
    pcm = audio.convert(clip, target_rate=24000, max_bytes=s.max_audio_bytes, max_seconds=s.max_audio_seconds)
    pieces = list(chunks.rechunk([pcm], chunks.chunk_bytes(24000, s.chunk_ms)))
    t0 = time.perf_counter()
    for i, (piece, last_piece) in enumerate(chunks.mark_last(pieces * args.burst_conversations)):
        direct.send(echo.audio_echo("c", piece, 24000, f"d{i // len(pieces)}", last_piece, max_bytes=s.max_message_bytes))
    direct_rate = len(pieces) * args.burst_conversations / (time.perf_counter() - t0)
    direct.leave()
    r.flushdb()

    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.platform()}")
    print(f"enqueue (say) call: p50 {pct(enqueue_ms, 50):.2f} ms, p99 {pct(enqueue_ms, 99):.2f} ms")
    print(f"enqueue -> first message, text echo, {args.conversations} conversations open, {len(lat)} samples: "
          f"p50 {pct(lat, 50):.2f} ms, p99 {pct(lat, 99):.2f} ms, max {max(lat):.2f} ms, mean {statistics.mean(lat):.2f} ms")
    print(f"direct send (no queue), text echo: p50 {pct(direct_lat, 50):.3f} ms, p99 {pct(direct_lat, 99):.3f} ms")
    print(f"latency ratio (queued / direct), p50: {pct(lat, 50) / pct(direct_lat, 50):.1f}x")
    print(f"one worker, burst pacing: {total} audio messages over {args.burst_conversations} conversations, "
          f"{worker_rate:.0f} messages/s")
    print(f"direct send loop (same messages, no queue): {direct_rate:.0f} messages/s")
    print(f"throughput ratio (worker / direct): {worker_rate / direct_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
