"""Streaming benchmark: a piece appended -> its audio on the wire, p50 / p99.

Starts one real worker process on a dedicated Redis database (ECHOQ_BENCH_REDIS_URL, default
redis://127.0.0.1:6379/8, flushed first), opens --conversations loopback rooms that do not wait
for a replica, and has one producer thread per conversation stream 24 kHz mono PCM in 20 ms
pieces at real time (``client.stream(...).write``) for --seconds. Each 20 ms piece is one echo
message, so the k-th message of a stream on the wire is its k-th piece. Latency is timed from
just before ``write`` to the moment a reader blocked on the room streams sees the message (so it
includes the append's own round trip and the reader's wake-up).

Beside it, in the same run, the same path with no queue: the same number of threads each build
the echo message of every piece and send it straight into a loopback room
(``LoopbackTransport.send``) at real time, timed the same way to the same reader.

    .venv/bin/python scripts/bench_stream.py [--conversations 10] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH_URL = os.environ.get("ECHOQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
os.environ["ECHOQ_REDIS_URL"] = BENCH_URL

from bench import RoomReader, pct, wait  # noqa: E402  (the same reader, percentile and polling)

from producer.client import EchoqClient  # noqa: E402
from worker import chunks, echo, keys  # noqa: E402
from worker.settings import get_settings  # noqa: E402
from worker.transports.loopback import LoopbackTransport  # noqa: E402

RATE = 24000
PIECE_S = 0.02


class Arrivals(RoomReader):
    """Notes when the k-th message of each room appears."""

    def __init__(self, rooms: list[str]) -> None:
        self.seen: dict[str, list[float]] = defaultdict(list)
        super().__init__(rooms)

    def take(self, stream: str, fields: dict[bytes, bytes], now: float, eid: bytes) -> None:
        self.seen[stream].append(now)


def real_time(pieces: list[bytes], send: object, sent_at: list[float]) -> None:
    """Call ``send(piece)`` for each piece when its 20 ms come, noting the time before each call."""
    t0 = time.perf_counter()
    for i, piece in enumerate(pieces):
        delay = t0 + i * PIECE_S - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent_at.append(time.perf_counter())
        send(piece)  # type: ignore[operator]


def latencies(arrivals: Arrivals, rooms: list[str], sent: dict[str, list[float]], skip: int) -> list[float]:
    out: list[float] = []
    for room in rooms:
        seen = arrivals.seen[keys.loopback_room(room)]
        for k, t0 in enumerate(sent[room]):
            if k >= skip:
                out.append((seen[k] - t0) * 1000)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=int, default=10, help="pieces per stream left out of the figures")
    args = ap.parse_args()

    r = redis.Redis.from_url(BENCH_URL)
    r.flushdb()
    s = get_settings()
    out = ROOT / "out" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(args.seconds * RATE)) / RATE
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * 220 * t)).astype("<i2").tobytes()
    size = chunks.chunk_bytes(RATE, 20)
    pieces = [pcm[i : i + size] for i in range(0, len(pcm), size)]

    env = {**os.environ, "ECHOQ_REDIS_URL": BENCH_URL, "ECHOQ_LOG_LEVEL": "WARNING", "ECHOQ_SCAN_INTERVAL_S": "0.5",
           "ECHOQ_MAX_SESSIONS": str(args.conversations)}
    worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "-c", str(args.conversations + 4),
                               "-n", "bench-stream@localhost"],
                              cwd=ROOT, env=env, stdout=(out / "worker-stream.log").open("wb"), stderr=subprocess.STDOUT)
    append_ms: list[float] = []
    try:
        wait(lambda: r.hexists(keys.WORKERS, "bench-stream@localhost"), 30, "the worker")
        client = EchoqClient(BENCH_URL)
        rooms = [f"stream-{i}" for i in range(args.conversations)]
        for i, room in enumerate(rooms):
            client.open(f"conv-{i}", f"loopback://{room}?replica=0")
        wait(lambda: all(r.exists(keys.lease(f"conv-{i}")) for i in range(len(rooms))), 60, "every room joined")
        time.sleep(1.5)  # let the worker's consumers pick up every conversation queue

        # 1. streams through echoq: append -> worker -> room
        arrivals = Arrivals(rooms)
        time.sleep(0.3)
        sent: dict[str, list[float]] = {room: [] for room in rooms}
        streams = [client.stream(f"conv-{i}", sample_rate=RATE) for i in range(len(rooms))]

        def produce(i: int) -> None:
            stream = streams[i]

            def write(piece: bytes) -> None:
                t0 = time.perf_counter()
                stream.write(piece)
                append_ms.append((time.perf_counter() - t0) * 1000)

            real_time(pieces, write, sent[rooms[i]])
            stream.finish()

        threads = [threading.Thread(target=produce, args=(i,)) for i in range(len(rooms))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for st in streams:
            client.wait(st.utterance_id, timeout=60)
        wait(lambda: all(len(arrivals.seen[keys.loopback_room(room)]) >= len(pieces) for room in rooms), 30,
             "every piece on the wire")
        arrivals.stop.set()
        queued = latencies(arrivals, rooms, sent, args.warmup)
    finally:
        worker.terminate()
        worker.wait(30)

    # 2. the same pieces sent straight into rooms at real time: no append, no worker, no cursor
    direct_rooms = [f"direct-{i}" for i in range(args.conversations)]
    arrivals = Arrivals(direct_rooms)
    time.sleep(0.3)
    sent = {room: [] for room in direct_rooms}

    def send_direct(room: str) -> None:
        transport = LoopbackTransport(f"loopback://{room}?replica=0", redis_client=redis.Redis.from_url(BENCH_URL))
        transport.join(1)

        def send(piece: bytes) -> None:
            transport.send(echo.audio_echo("c", piece, RATE, room, False, max_bytes=s.max_message_bytes))

        real_time(pieces, send, sent[room])
        transport.leave()

    threads = [threading.Thread(target=send_direct, args=(room,)) for room in direct_rooms]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wait(lambda: all(len(arrivals.seen[keys.loopback_room(room)]) >= len(pieces) for room in direct_rooms), 30,
         "every direct piece")
    arrivals.stop.set()
    direct = latencies(arrivals, direct_rooms, sent, args.warmup)
    r.flushdb()

    load = os.getloadavg()[0]
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.platform()}, load average {load:.2f}")
    print(f"{args.conversations} streams at once, 24 kHz mono, 20 ms pieces at real time for {args.seconds:g} s, "
          f"{len(queued)} pieces timed ({args.warmup} per stream left out)")
    print(f"append (write) call alone: p50 {pct(append_ms, 50):.2f} ms, p99 {pct(append_ms, 99):.2f} ms")
    print(f"piece appended -> its audio on the wire: p50 {pct(queued, 50):.2f} ms, p99 {pct(queued, 99):.2f} ms, "
          f"max {max(queued):.2f} ms")
    print(f"direct send (no queue), same pieces and threads: p50 {pct(direct, 50):.2f} ms, "
          f"p99 {pct(direct, 99):.2f} ms, max {max(direct):.2f} ms")
    print(f"goal p50 <= 10 ms: {'met' if pct(queued, 50) <= 10 else f'missed by {pct(queued, 50) - 10:.2f} ms'}; "
          f"p99 <= 30 ms: {'met' if pct(queued, 99) <= 30 else f'missed by {pct(queued, 99) - 30:.2f} ms'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
