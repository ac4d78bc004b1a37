"""Microphone echo pacing: how a listener would hear the track one worker writes.

Starts one real worker process on a dedicated Redis database (ECHOQ_BENCH_REDIS_URL, default
redis://127.0.0.1:6379/8, flushed first), opens --conversations loopback rooms in microphone
mode, plays --clips tones of --seconds each into every one, and prints, per room and overall,
the figures the simulator reports for a microphone track (simulator/mic.py): ``max_gap`` (the
longest the listener's buffer ran dry), ``max_lead`` (the most audio written ahead of real time),
``audio_seconds`` and ``wall_seconds``. It also checks that every sample arrived in order.

These are figures, not pass/fail: on a busy machine the gaps grow. The tests assert
completeness and order only.

    .venv/bin/python scripts/bench_microphone.py [--conversations 4] [--clips 3] [--seconds 1.5]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH_URL = os.environ.get("ECHOQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
os.environ["ECHOQ_REDIS_URL"] = BENCH_URL

from producer.client import EchoqClient  # noqa: E402
from worker import keys  # noqa: E402
from worker.simulator.mic import MicTrack  # noqa: E402

RATE = 24000


def tone(seconds: float, freq: float) -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def track_of(r: redis.Redis, room: str) -> tuple[MicTrack, bytes]:
    track = MicTrack()
    entries: Any = r.xrange(keys.loopback_mic(room))
    for _id, f in entries:
        track.add(bytes(f[b"pcm"]), int(f[b"sample_rate"]), float(f[b"t"]))
    return track, bytes(track.pcm)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--frame-ms", type=int, default=20)
    parser.add_argument("--gap-ms", type=int, default=200)
    args = parser.parse_args()

    r = redis.Redis.from_url(BENCH_URL)
    r.flushdb()
    env = {**os.environ, "ECHOQ_REDIS_URL": BENCH_URL, "ECHOQ_MIC_FRAME_MS": str(args.frame_ms),
           "ECHOQ_MIC_GAP_MS": str(args.gap_ms), "ECHOQ_LOG_LEVEL": "WARNING"}
    log = Path(tempfile.mkdtemp(prefix="echoq-bench-mic-")) / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "-c", "8", "-n", "bench-mic@localhost"],
                              cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        client = EchoqClient(BENCH_URL)
        rooms = [f"bench-mic-{i}" for i in range(args.conversations)]
        clips = [tone(args.seconds, 300 + 100 * k) for k in range(args.clips)]
        ids: list[str] = []
        for room in rooms:
            client.open(room, f"loopback://{room}?replica=0", mode="microphone")  # no simulator here
            for clip in clips:
                ids.append(client.play(room, clip, format="raw", source_rate=RATE, sample_rate=RATE))
        t0 = time.monotonic()
        for uid in ids:
            client.wait(uid, timeout=120 + args.clips * args.seconds * 4)
        elapsed = time.monotonic() - t0
        silence = b"\0" * (RATE * 2 * args.gap_ms // 1000)
        print(f"machine: {platform.node()} {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}")
        print(f"{args.conversations} conversations x {args.clips} clips x {args.seconds}s, "
              f"frames {args.frame_ms} ms, one worker, {elapsed:.1f}s to send everything")
        print(f"{'room':<14} {'frames':>7} {'audio s':>8} {'wall s':>8} {'max_gap ms':>11} {'max_lead ms':>12} complete")
        gaps, leads = [], []
        for room in rooms:
            track, pcm = track_of(r, room)
            complete = pcm == silence.join(clips)
            gaps.append(track.max_gap)
            leads.append(track.max_lead)
            print(f"{room:<14} {track.frames:>7} {track.audio_seconds:>8.2f} {track.wall_seconds:>8.2f} "
                  f"{track.max_gap * 1000:>11.1f} {track.max_lead * 1000:>12.1f} {'yes' if complete else 'NO'}")
        print(f"worst max_gap {max(gaps) * 1000:.1f} ms, worst max_lead {max(leads) * 1000:.1f} ms")
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        r.flushdb()
    return 0


if __name__ == "__main__":
    sys.exit(main())
