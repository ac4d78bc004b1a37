"""echoq's benchmarks, one command: each figure beside its anchor in the same run, repeated.

Every subcommand runs on a dedicated Redis database (ECHOQ_BENCH_REDIS_URL, default
redis://127.0.0.1:6379/8, flushed first and after), repeats its measurement --repeats times and
prints min / median / max of each figure with the load average before and after. The worker's
log goes to out/bench/worker.log at ECHOQ_BENCH_LOG_LEVEL (default WARNING; INFO shows each
step of each utterance with its timing).

``delivery``  one real worker process (threads pool, 8 threads), loopback rooms that do not
              wait for a replica, burst pacing: --audio-seconds of 24 kHz audio on each of
              --burst-conversations conversations queued at once. Messages/s first to last
              message on the wire, and the worker's CPU per message (its user + system time
              over the burst, conversion included). Beside it, a direct loop of
              ``LoopbackTransport.send`` with the same messages: messages/s and CPU per message.
              With --latency-samples > 0, also enqueue -> first message of a text echo with
              --conversations open, and one direct send, p50 / p99.
``enqueue``   ``EchoqClient.say`` calls/s from one process, one call at a time, and
              ``say_many`` batches of --batch, to one open conversation (no worker: the
              doorbells wait in the broker).
``pacing``    one worker in real-time pacing (--threads pool threads), --rooms conversations each
              playing two --seconds clips back to back, all enqueued at once: how late each
              chunk reaches the room against the real-time schedule its utterance's first
              chunk set (p50 / p99 / max, and the last chunk's lateness: falling behind shows
              there) as this script's reader got each chunk, and by the rooms' own clock (the
              Redis time in each entry id: when it went in, whatever the reader's delay),
              enqueue -> first chunk, the silence between the two clips beyond one chunk
              interval, how many rooms finished, and lease losses in the worker's log.
``load``      one worker (burst pacing), --conversations loopback rooms, --texts text lines for
              each from --producers threads of one process (each thread its share of the
              rooms), with ``say`` one call at a time or ``say_many`` one batch per room:
              calls/s, the time until the last line is on the wire, and enqueue -> on the wire
              p50 / p99 / max over every line.
``soak``      one worker in real-time pacing holding --rooms loopback rooms for --minutes, each
              room given a 2 s clip and a text line every 4 s: the worker's RSS idle, with the
              rooms held (per room), every --sample-s while they play (first and last sample after
              the first minute, growth between them, largest), and after they are closed.
``interrupt`` one worker in real-time pacing, one conversation speaking a long utterance with
              --queued texts queued behind it: ``interrupt()`` call -> ``conversation.interrupt``
              on the wire, --samples times per repeat, p50 / p99 / max.
``firstaudio`` a 10-minute and a 5-second MP3 (ffmpeg, from a tone, 44.1 kHz mono 128 kb/s, into
              out/bench/): the ``play()`` call alone, and enqueue -> first chunk on the wire with
              one real worker (loopback room ``?replica=0``), in burst and in real-time pacing,
              --samples per repeat (each utterance is interrupted once its first chunk is out).
              Beside them, converting the 10-minute MP3 to 24 kHz s16le mono three ways: the
              ffmpeg CLI (the whole process), pydub, and echoq's ``audio.convert``; and the
              ratio of echoq's speed to the ffmpeg CLI's. And the floors on this machine: reading
              the file, a bare SET of its bytes, an ffmpeg started on it until its first 4 KB of
              output, and one started ahead and fed through its stdin.

    .venv/bin/python scripts/bench.py delivery [--repeats 3] [--burst-conversations 4]
    .venv/bin/python scripts/bench.py enqueue [--repeats 3] [--count 2000] [--batch 200]
    .venv/bin/python scripts/bench.py pacing [--repeats 3] [--rooms 100] [--seconds 20] [--threads 8]
    .venv/bin/python scripts/bench.py load [--conversations 200] [--texts 50] [--producers 4] [--mode say]
    .venv/bin/python scripts/bench.py soak [--minutes 30] [--rooms 50]
    .venv/bin/python scripts/bench.py interrupt [--repeats 3] [--samples 20] [--queued 100]
    .venv/bin/python scripts/bench.py firstaudio [--repeats 3] [--samples 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH_URL = os.environ.get("ECHOQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
os.environ["ECHOQ_REDIS_URL"] = BENCH_URL

from producer.client import EchoqClient  # noqa: E402
from worker import audio, chunks, echo, keys, redisio  # noqa: E402
from worker.settings import get_settings  # noqa: E402
from worker.transports.loopback import LoopbackTransport  # noqa: E402

OUT = ROOT / "out" / "bench"
WORKER_NAME = "bench@localhost"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def wait(pred: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Figures:
    """Named figures collected over repeats, printed as min / median / max."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def print(self) -> None:
        width = max(len(n) for n in self.values)
        for name, vals in self.values.items():
            each = f"  each: {', '.join(f'{v:.3f}'.rstrip('0').rstrip('.') for v in vals)}" \
                if 2 < len(vals) <= 10 else ""  # so "in k of n repeats" can be read off, not guessed
            print(f"  {name:<{width}}  min {min(vals):10.3f}  median {statistics.median(vals):10.3f}  "
                  f"max {max(vals):10.3f}  (n={len(vals)}){each}")


class RoomReader:
    """A reader blocked on every room stream, from its start (``$`` would be read again at every
    call and miss what came in between), handing each message to :meth:`take` with the time it
    was read and its stream entry id (which holds Redis's clock, in ms, when it was written)."""

    def __init__(self, rooms: list[str]) -> None:
        self.r = redisio.connect(BENCH_URL)
        self.last = {keys.loopback_room(room): "0-0" for room in rooms}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def take(self, stream: str, fields: dict[bytes, bytes], now: float, eid: bytes) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self.stop.is_set():
            res = self.r.xread(self.last, block=100, count=1000)  # type: ignore[arg-type]
            now = time.perf_counter()
            for stream, entries in res or []:
                name = stream.decode()
                for eid, fields in entries:
                    self.last[name] = eid.decode()
                    self.take(name, fields, now, eid)


class Arrivals(RoomReader):
    """Notes when each inference id first appears and when each ``conversation.interrupt`` does."""

    def __init__(self, rooms: list[str]) -> None:
        self.seen: dict[bytes, float] = {}
        self.interrupts: list[float] = []
        self.count = 0
        super().__init__(rooms)

    def take(self, stream: str, fields: dict[bytes, bytes], now: float, eid: bytes) -> None:
        self.count += 1
        data = fields[b"data"]
        if b'"conversation.interrupt"' in data:
            self.interrupts.append(now)
            return
        marker = data[data.find(b'"inference_id":"') + 16:].split(b'"', 1)[0]
        self.seen.setdefault(marker, now)


class Bench:
    """The bench database, a client, and at most one worker process."""

    def __init__(self) -> None:
        self.r = redisio.connect(BENCH_URL)
        self.r.flushdb()
        self.settings = get_settings()
        OUT.mkdir(parents=True, exist_ok=True)
        for old_log in OUT.glob("worker*.log"):  # a log of an earlier run must not count in this one
            old_log.unlink()
        self.client = EchoqClient(BENCH_URL)
        self.workers: list[subprocess.Popen[bytes]] = []

    @property
    def worker(self) -> subprocess.Popen[bytes] | None:
        return self.workers[0] if self.workers else None

    def start_worker(self, threads: int = 8, **env_extra: str) -> int:
        """Start one more worker process (the first is named WORKER_NAME); returns its pid."""
        name = WORKER_NAME if not self.workers else WORKER_NAME.replace("@", f"{len(self.workers)}@")
        env = {**os.environ, "ECHOQ_REDIS_URL": BENCH_URL, "ECHOQ_LOG_LEVEL": os.environ.get("ECHOQ_BENCH_LOG_LEVEL", "WARNING"),
               "ECHOQ_SCAN_INTERVAL_S": "0.5", "ECHOQ_MAX_SESSIONS": "200", **env_extra}
        log_name = "worker.log" if not self.workers else f"worker{len(self.workers)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "worker", "-c", str(threads), "-n", name],
            cwd=ROOT, env=env, stdout=(OUT / log_name).open("wb"), stderr=subprocess.STDOUT)
        self.workers.append(proc)
        wait(lambda: self.r.hexists(keys.WORKERS, name), 60, f"the worker {name}")
        return proc.pid

    def open_rooms(self, prefix: str, n: int) -> list[str]:
        """Open ``n`` loopback conversations ``prefix-i`` (room of the same name), wait until owned."""
        ids = [f"{prefix}-{i}" for i in range(n)]
        for cid in ids:
            self.client.open(cid, f"loopback://{cid}?replica=0")
        if self.worker is not None:
            wait(lambda: all(self.r.exists(keys.lease(c)) for c in ids), 60, f"{prefix} rooms joined")
            time.sleep(1.0)  # let the worker's consumers pick up every conversation queue
        return ids

    def close(self) -> None:
        for proc in self.workers:
            proc.terminate()
        for proc in self.workers:
            proc.wait(30)
        self.r.flushdb()


def tone(path: Path, seconds: float, rate: int = 24000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes())
    return path


def header(what: str) -> None:
    print(f"{what} — machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.platform()}; load average before: {loadavg()}")


# delivery ------------------------------------------------------------------------------------

def bench_delivery(args: argparse.Namespace) -> None:
    header("delivery")
    b = Bench()
    figs = Figures()
    s = b.settings
    clip = tone(OUT / "burst.wav", args.audio_seconds)
    try:
        pid = b.start_worker()
        if args.latency_samples:
            latency(b, args, figs)
        for rep in range(args.repeats):
            ids = b.open_rooms(f"burst{rep}", args.burst_conversations)
            cpu0 = cpu_seconds(pid)
            uids = [b.client.play(cid, clip) for cid in ids]
            for uid in uids:
                b.client.wait(uid, timeout=600, poll_s=0.05)
            cpu = cpu_seconds(pid) - cpu0
            rooms = [keys.loopback_room(cid) for cid in ids]
            first = min(int(b.r.xrange(room, count=1)[0][0].split(b"-")[0]) for room in rooms)
            last = max(int(b.r.xrevrange(room, count=1)[0][0].split(b"-")[0]) for room in rooms)
            total = sum(b.r.xlen(room) for room in rooms)
            figs.add("worker, burst: messages/s", total / max(0.001, (last - first) / 1000))
            figs.add("worker, burst: CPU ms per message", cpu * 1000 / total)
            for cid in ids:
                b.client.close(cid)

            # the anchor: direct sends of the same messages, no queue, no log, no cursor
            direct = LoopbackTransport(f"loopback://direct{rep}?replica=0", redis_client=b.r)
            direct.join(1)
            pcm = audio.convert(clip, target_rate=24000, max_bytes=s.max_audio_bytes, max_seconds=s.max_audio_seconds)
            pieces = list(chunks.rechunk([pcm], chunks.chunk_bytes(24000, s.chunk_ms)))
            t0, c0 = time.perf_counter(), time.process_time()
            n = 0
            for i, (piece, last_piece) in enumerate(chunks.mark_last(pieces * args.burst_conversations)):
                direct.send(echo.audio_echo("c", piece, 24000, f"d{i // len(pieces)}", last_piece,
                                            max_bytes=s.max_message_bytes))
                n += 1
            figs.add("direct loop: messages/s", n / (time.perf_counter() - t0))
            figs.add("direct loop: CPU ms per message", (time.process_time() - c0) * 1000 / n)
            direct.leave()
            figs.add("ratio worker / direct, messages/s",
                     figs.values["worker, burst: messages/s"][-1] / figs.values["direct loop: messages/s"][-1])
    finally:
        b.close()
    print(f"{args.burst_conversations} conversations x {args.audio_seconds:g} s of audio "
          f"({s.chunk_ms} ms chunks), {args.repeats} repeats:")
    figs.print()
    print(f"load average after: {loadavg()}")


def latency(b: Bench, args: argparse.Namespace, figs: Figures) -> None:
    """Enqueue -> first message of a text echo, round-robin over --conversations open ones."""
    ids = b.open_rooms("lat", args.conversations)
    arrivals = Arrivals(ids)
    time.sleep(0.3)
    direct = LoopbackTransport("loopback://direct-lat?replica=0", redis_client=b.r)
    direct.join(1)
    text_msg = echo.text_echo("c", "Hello there!", "direct", max_bytes=b.settings.max_message_bytes)
    try:
        for rep in range(args.repeats):
            lat: list[float] = []
            for n in range(args.latency_samples + 20):
                uid = f"lat{rep}-{n}"
                t0 = time.perf_counter()
                b.client.say(ids[n % len(ids)], "Hello there!", utterance_id=uid)
                wait(lambda uid=uid: uid.encode() in arrivals.seen, 10, f"utterance {uid}")
                if n >= 20:  # the first few warm connections and code paths
                    lat.append((arrivals.seen[uid.encode()] - t0) * 1000)
            figs.add("text enqueue -> on the wire, p50 ms", pct(lat, 50))
            figs.add("text enqueue -> on the wire, p99 ms", pct(lat, 99))
            direct_lat = []
            for _ in range(args.latency_samples):
                t0 = time.perf_counter()
                direct.send(text_msg)
                direct_lat.append((time.perf_counter() - t0) * 1000)
            figs.add("direct send, text, p50 ms", pct(direct_lat, 50))
    finally:
        arrivals.stop.set()
        direct.leave()
    for cid in ids:
        b.client.close(cid)


# enqueue -------------------------------------------------------------------------------------

def bench_enqueue(args: argparse.Namespace) -> None:
    header("enqueue")
    b = Bench()
    figs = Figures()
    try:
        b.open_rooms("enq", 1)
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            for n in range(args.count):
                b.client.say("enq-0", "Hello there!", utterance_id=f"single{rep}-{n}")
            figs.add("say(), one at a time: calls/s", args.count / (time.perf_counter() - t0))
            say_many = getattr(b.client, "say_many", None)
            if say_many is not None:
                t0 = time.perf_counter()
                for start in range(0, args.count, args.batch):
                    say_many("enq-0", ["Hello there!"] * min(args.batch, args.count - start),
                             utterance_ids=[f"many{rep}-{n}" for n in range(start, min(start + args.batch, args.count))])
                figs.add(f"say_many(), batches of {args.batch}: utterances/s", args.count / (time.perf_counter() - t0))
        got = b.client.store.log_length("enq-0")
        per_rep = args.count * (2 if getattr(b.client, "say_many", None) else 1)
        assert got == per_rep * args.repeats, f"the log holds {got} entries, expected {per_rep * args.repeats}"
    finally:
        b.close()
    print(f"{args.count} text utterances per figure, {args.repeats} repeats:")
    figs.print()
    print(f"load average after: {loadavg()}")


# pacing --------------------------------------------------------------------------------------

class Chunks(RoomReader):
    """Every audio message's arrival (when this reader read it) and when it was written (Redis's
    clock, from its entry id, in seconds), per room and inference id, in order."""

    def __init__(self, rooms: list[str]) -> None:
        self.arrivals: dict[tuple[str, bytes], list[float]] = {}
        self.written: dict[tuple[str, bytes], list[float]] = {}
        self.count = 0
        super().__init__(rooms)

    def take(self, stream: str, fields: dict[bytes, bytes], now: float, eid: bytes) -> None:
        self.count += 1
        data = fields[b"data"]
        marker = data[data.find(b'"inference_id":"') + 16:].split(b'"', 1)[0]
        self.arrivals.setdefault((stream, marker), []).append(now)
        self.written.setdefault((stream, marker), []).append(int(eid.split(b"-", 1)[0]) / 1000)


def lateness_ms(times: list[float], chunk_s: float) -> list[float]:
    """Each chunk's lateness (k >= 1) against its utterance's real-time grid: the pacer keeps one
    chunk ahead of playback, so chunks 0 and 1 go at once and chunk k is due k - 1 intervals after
    the earliest start that every later chunk allows (so lateness is never negative)."""
    if len(times) < 2:
        return []
    start = min(t - (k - 1) * chunk_s for k, t in enumerate(times) if k)
    return [(t - start - (k - 1) * chunk_s) * 1000 for k, t in enumerate(times) if k]


def evalsha_stats(r: redis.Redis) -> tuple[int, int]:
    """Redis's count of EVALSHA calls and the microseconds it spent in them, server-wide
    (``INFO commandstats``): the cost of the cursor script, as Redis sees it."""
    stats = r.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def bench_pacing(args: argparse.Namespace) -> None:
    header("pacing")
    b = Bench()
    figs = Figures()
    chunk_s = b.settings.chunk_ms / 1000
    clip = tone(OUT / "pace.wav", args.seconds)
    per_utt = int(round(args.seconds / chunk_s))
    try:
        for _ in range(args.workers):  # each takes at most its share of the rooms
            b.start_worker(threads=args.threads, ECHOQ_PACING="realtime",
                           ECHOQ_MAX_SESSIONS=str(-(-args.rooms // args.workers)),
                           ECHOQ_PACING_LOOP="true" if args.loop == "on" else "false")
        for rep in range(args.repeats):
            ids = b.open_rooms(f"pace{rep}", args.rooms)
            reader = Chunks(ids)
            time.sleep(0.3)
            pids = [proc.pid for proc in b.workers]
            cpu0, own0 = sum(cpu_seconds(pid) for pid in pids), time.process_time()
            scripts0 = evalsha_stats(b.r)
            t_enq: dict[str, float] = {}
            t0 = time.perf_counter()
            for n, cid in enumerate(ids):
                # --stagger: rooms start spread over that many seconds, as conversations do
                time.sleep(max(0.0, t0 + args.stagger * n / len(ids) - time.perf_counter()))
                t_enq[cid] = time.perf_counter()
                b.client.play(cid, clip, utterance_id=f"{cid}-a")
                b.client.play(cid, clip, utterance_id=f"{cid}-b")
            deadline = time.monotonic() + 2 * args.seconds * 3 + args.stagger + 60
            while time.monotonic() < deadline and reader.count < 2 * per_utt * len(ids):
                time.sleep(0.2)
            reader.stop.set()
            cpu = sum(cpu_seconds(pid) for pid in pids) - cpu0
            figs.add("workers' CPU ms per message", cpu * 1000 / max(1, reader.count))
            figs.add("this script's CPU ms per message (enqueue, reading the rooms)",
                     (time.process_time() - own0) * 1000 / max(1, reader.count))
            calls, usec = (after - before for after, before in zip(evalsha_stats(b.r), scripts0, strict=True))
            # the whole server's, so nothing else should use this Redis during the run
            figs.add("Redis time per script call (EVALSHA, whole server) us", usec / max(1, calls))
            late: list[float] = []
            last_late: list[float] = []
            late_written: list[float] = []
            first: list[float] = []
            gaps: list[float] = []
            finished = 0
            for cid in ids:
                room = keys.loopback_room(cid)
                a = reader.arrivals.get((room, f"{cid}-a".encode()), [])
                bb = reader.arrivals.get((room, f"{cid}-b".encode()), [])
                if len(a) == per_utt and len(bb) == per_utt:
                    finished += 1
                if a:
                    first.append((a[0] - t_enq[cid]) * 1000)
                for times in (a, bb):  # chunk 0 is timed above (first chunk)
                    if len(times) >= 2:
                        late.extend(lateness_ms(times, chunk_s))
                        last_late.append(late[-1])
                for uid in (f"{cid}-a", f"{cid}-b"):
                    late_written.extend(lateness_ms(reader.written.get((room, uid.encode()), []), chunk_s))
                if a and bb:
                    # clip a's audio ends one interval after its last chunk went (sent one ahead);
                    # b's first chunk should be there by then: silence is anything beyond
                    gaps.append(max(0.0, (bb[0] - (a[-1] + chunk_s)) * 1000))
            figs.add("rooms that got every chunk of both clips", finished)
            if late:
                figs.add("chunk lateness p50 ms", pct(late, 50))
                figs.add("chunk lateness p99 ms", pct(late, 99))
                figs.add("chunk lateness max ms", max(late))
                figs.add("last chunk lateness p99 ms (behind real time)", pct(last_late, 99))
            if late_written:  # when each chunk went into its room, not when the reader got to it
                figs.add("chunk lateness by the rooms' clock p50 ms", pct(late_written, 50))
                figs.add("chunk lateness by the rooms' clock p99 ms", pct(late_written, 99))
            if first:
                figs.add("enqueue -> first chunk p50 ms", pct(first, 50))
                figs.add("enqueue -> first chunk max ms", max(first))
            if gaps:
                figs.add("silence between the clips p50 ms", pct(gaps, 50))
                figs.add("silence between the clips p99 ms", pct(gaps, 99))
            for cid in ids:
                b.client.close(cid)
            wait(lambda ids=ids: not any(b.r.exists(keys.lease(c)) for c in ids), 120, "rooms closed")
        logs = "".join(path.read_text(errors="replace") for path in OUT.glob("worker*.log"))
        figs.add("lease.lost in the workers' logs (all repeats)", logs.count("lease.lost"))
        # a stall too long to catch up: that utterance's later chunks are all late by it
        figs.add("pacing.clock_restarted in the workers' logs (all repeats)", logs.count("pacing.clock_restarted"))
        figs.add("gc.pause (full collections >= 100 ms) in the workers' logs", logs.count("gc.pause"))
    finally:
        b.close()
    print(f"{args.rooms} rooms x 2 clips of {args.seconds:g} s ({b.settings.chunk_ms} ms chunks), starts spread over "
          f"{args.stagger:g} s, {args.workers} worker process(es) with {args.threads} threads each, real-time pacing, pacing loop {args.loop}, "
          f"{args.repeats} repeats:")
    figs.print()
    print(f"load average after: {loadavg()}")


# load ----------------------------------------------------------------------------------------

def bench_load(args: argparse.Namespace) -> None:
    header("load")
    b = Bench()
    figs = Figures()
    total = args.conversations * args.texts
    try:
        b.start_worker(ECHOQ_MAX_SESSIONS=str(args.conversations + 10))
        for rep in range(args.repeats):
            ids = b.open_rooms(f"load{rep}", args.conversations)
            arrivals = Arrivals(ids)
            time.sleep(0.5)
            enqueued: dict[bytes, float] = {}
            lock = threading.Lock()

            def produce(mine: list[str], lock: threading.Lock = lock, enqueued: dict[bytes, float] = enqueued) -> None:
                client = EchoqClient(BENCH_URL)
                stamps: dict[bytes, float] = {}
                if args.mode == "many":
                    for cid in mine:
                        uids = [f"{cid}-{n}" for n in range(args.texts)]
                        t = time.perf_counter()
                        client.say_many(cid, [f"line {n}" for n in range(args.texts)], utterance_ids=uids)
                        stamps.update((u.encode(), t) for u in uids)
                else:
                    for n in range(args.texts):
                        for cid in mine:
                            uid = f"{cid}-{n}"
                            stamps[uid.encode()] = time.perf_counter()
                            client.say(cid, f"line {n}", utterance_id=uid)
                with lock:
                    enqueued.update(stamps)

            shares = [ids[i::args.producers] for i in range(args.producers)]
            threads = [threading.Thread(target=produce, args=(share,)) for share in shares]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            t_enq = time.perf_counter() - t0
            wait(lambda arrivals=arrivals: len(arrivals.seen) >= total, 300, f"all {total} lines on the wire")
            arrivals.stop.set()
            lat = [(arrivals.seen[u] - t) * 1000 for u, t in enqueued.items()]
            figs.add(f"{args.mode}: calls/s from {args.producers} producer threads" if args.mode == "say"
                     else f"{args.mode}: lines/s enqueued from {args.producers} producer threads", total / t_enq)
            figs.add("first enqueue -> last line on the wire, s", max(arrivals.seen.values()) - t0)
            figs.add("enqueue -> on the wire p50 ms", pct(lat, 50))
            figs.add("enqueue -> on the wire p99 ms", pct(lat, 99))
            figs.add("enqueue -> on the wire max ms", max(lat))
            for cid in ids:
                b.client.close(cid)
    finally:
        b.close()
    print(f"{args.conversations} conversations x {args.texts} text lines, {args.producers} producer threads, "
          f"mode {args.mode}, one worker, burst pacing, {args.repeats} repeats:")
    figs.print()
    print(f"load average after: {loadavg()}")


# soak ----------------------------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no VmRSS for process {pid}")


def bench_soak(args: argparse.Namespace) -> None:
    header("soak")
    b = Bench()
    clip = tone(OUT / "soak.wav", 2.0)
    samples: list[tuple[float, float]] = []
    said = played = 0
    try:
        pid = b.start_worker(ECHOQ_PACING="realtime", ECHOQ_MAX_SESSIONS=str(args.rooms + 10))
        time.sleep(2.0)
        idle = rss_mb(pid)
        ids = b.open_rooms("soak", args.rooms)
        held = rss_mb(pid)
        print(f"RSS idle {idle:.1f} MB; with {args.rooms} rooms held {held:.1f} MB: "
              f"{(held - idle) / args.rooms:.3f} MB per room", flush=True)
        t0 = time.monotonic()
        next_sample = t0
        cycle = 0
        while time.monotonic() - t0 < args.minutes * 60:
            for cid in ids:
                b.client.play(cid, clip, utterance_id=f"{cid}-c{cycle}")
                b.client.say(cid, f"line {cycle}", utterance_id=f"{cid}-t{cycle}")
            played += len(ids)
            said += len(ids)
            cycle += 1
            deadline = t0 + cycle * 4.0
            while time.monotonic() < deadline:
                if time.monotonic() >= next_sample:
                    elapsed = time.monotonic() - t0
                    samples.append((elapsed, rss_mb(pid)))
                    print(f"  {elapsed / 60:5.1f} min  RSS {samples[-1][1]:7.1f} MB  load {loadavg()}", flush=True)
                    next_sample += args.sample_s
                time.sleep(0.2)
        for cid in ids:
            b.client.wait(f"{cid}-t{cycle - 1}", timeout=120, poll_s=0.2)
        failed = sum(1 for cid in ids for c in range(cycle) for kind in "ct"
                     if (b.client.status(f"{cid}-{kind}{c}") or {}).get("state") not in ("sent", "spoken"))
        for cid in ids:
            b.client.close(cid)
        wait(lambda: not any(b.r.exists(keys.lease(c)) for c in ids), 120, "rooms closed")
        time.sleep(2.0)
        closed = rss_mb(pid)
    finally:
        b.close()
    warm = [rss for elapsed, rss in samples if elapsed >= 60] or [rss for _, rss in samples]
    print(f"{args.rooms} rooms for {args.minutes:g} min: {played} clips and {said} lines enqueued, {failed} not sent")
    print(f"  RSS idle {idle:.1f} MB, rooms held {held:.1f} MB ({(held - idle) / args.rooms:.3f} MB per room)")
    print(f"  RSS after the first minute {warm[0]:.1f} MB, at the end {warm[-1]:.1f} MB "
          f"({(warm[-1] - warm[0]) / warm[0] * 100:+.1f} %), largest {max(warm):.1f} MB")
    print(f"  RSS after every room closed {closed:.1f} MB")
    print(f"load average after: {loadavg()}")


# interrupt -----------------------------------------------------------------------------------

def bench_interrupt(args: argparse.Namespace) -> None:
    header("interrupt")
    b = Bench()
    figs = Figures()
    clip = tone(OUT / "long.wav", 120.0)
    try:
        b.start_worker(ECHOQ_PACING="realtime")
        (cid,) = b.open_rooms("intr", 1)
        arrivals = Arrivals([cid])
        time.sleep(0.3)
        try:
            for rep in range(args.repeats):
                lat: list[float] = []
                for n in range(args.samples):
                    uid = b.client.play(cid, clip, utterance_id=f"long{rep}-{n}")
                    wait(lambda uid=uid: uid.encode() in arrivals.seen, 30, "the long utterance on the wire")
                    for q in range(args.queued):
                        b.client.say(cid, "queued", utterance_id=f"q{rep}-{n}-{q}")
                    before = len(arrivals.interrupts)
                    time.sleep(0.1)  # the long utterance is in flight, the texts wait behind it
                    t0 = time.perf_counter()
                    b.client.interrupt(cid)
                    wait(lambda before=before: len(arrivals.interrupts) > before, 30, "conversation.interrupt")
                    lat.append((arrivals.interrupts[before] - t0) * 1000)
                    b.client.wait(uid, timeout=30, poll_s=0.01)
                figs.add("interrupt() -> conversation.interrupt, p50 ms", pct(lat, 50))
                figs.add("interrupt() -> conversation.interrupt, p99 ms", pct(lat, 99))
                figs.add("interrupt() -> conversation.interrupt, max ms", max(lat))
        finally:
            arrivals.stop.set()
    finally:
        b.close()
    print(f"{args.samples} interrupts per repeat, {args.queued} queued behind a 120 s utterance "
          f"in real-time pacing, {args.repeats} repeats:")
    figs.print()
    print(f"load average after: {loadavg()}")


# firstaudio ----------------------------------------------------------------------------------

def mp3_tone(path: Path, seconds: float) -> Path:
    """A 440 Hz tone as a 44.1 kHz mono 128 kb/s MP3, made once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                        f"sine=frequency=440:duration={seconds:g}:sample_rate=44100", "-ac", "1", "-c:a", "libmp3lame",
                        "-b:a", "128k", str(path)], check=True, timeout=300)
    return path


def bench_firstaudio(args: argparse.Namespace) -> None:
    header("firstaudio")
    figs = Figures()
    clips = {"10-min MP3": mp3_tone(OUT / "tone-600s.mp3", 600), "5-s MP3": mp3_tone(OUT / "tone-5s.mp3", 5)}
    for pacing in ("burst", "realtime"):
        b = Bench()
        try:
            b.start_worker(ECHOQ_PACING=pacing)
            (cid,) = b.open_rooms(f"first-{pacing}", 1)
            arrivals = Arrivals([cid])
            time.sleep(0.3)
            try:
                for rep in range(args.repeats):
                    for name, clip in clips.items():
                        calls, firsts, after_call = [], [], []
                        for n in range(args.samples):
                            uid = f"{pacing}-{rep}-{name[:2]}-{n}"
                            t0 = time.perf_counter()
                            b.client.play(cid, clip, utterance_id=uid)
                            t1 = time.perf_counter()
                            wait(lambda uid=uid, seen=arrivals.seen: uid.encode() in seen, 30, f"{uid}'s first chunk")
                            calls.append((t1 - t0) * 1000)
                            firsts.append((arrivals.seen[uid.encode()] - t0) * 1000)
                            after_call.append((arrivals.seen[uid.encode()] - t1) * 1000)
                            b.client.interrupt(cid)  # the rest of it is not what is measured
                            b.client.wait(uid, timeout=60, poll_s=0.01)
                            b.r.delete(keys.blob(uid))
                            time.sleep(0.1)
                        if pacing == "burst":
                            figs.add(f"play() call, {name}, median of {args.samples} ms", statistics.median(calls))
                        figs.add(f"enqueue -> first chunk, {name}, {pacing}, median ms", statistics.median(firsts))
                        # the same without the upload: from play() returning (the utterance queued)
                        figs.add(f"play() returned -> first chunk, {name}, {pacing}, median ms",
                                 statistics.median(after_call))
            finally:
                arrivals.stop.set()
        finally:
            b.close()
    for ratio in ("burst", "realtime"):
        for timed, label in (("enqueue", "first chunk"), ("play() returned", "from play() returned")):
            ten = figs.values[f"{timed} -> first chunk, 10-min MP3, {ratio}, median ms"]
            five = figs.values[f"{timed} -> first chunk, 5-s MP3, {ratio}, median ms"]
            for a, c in zip(ten, five, strict=True):
                figs.add(f"{label}, 10-min / 5-s, {ratio}", a / c)
    floors(clips["10-min MP3"], args.repeats, args.samples, figs)
    conversion(clips["10-min MP3"], args.repeats, figs)
    print(f"{args.samples} samples per figure and repeat, {args.repeats} repeats (each figure: the median of a "
          "repeat's samples, then min / median / max over repeats):")
    figs.print()
    print(f"load average after: {loadavg()}")


def floors(clip: Path, repeats: int, samples: int, figs: Figures) -> None:
    """What the figures above cannot go below on this machine: reading the 10-minute MP3 and a
    bare SET of its bytes (the play() call's floor); an ffmpeg process started on the file and
    one started earlier, waiting on its stdin, each until its first 4 KB of decoded output."""
    r = redisio.connect(BENCH_URL)
    args = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-i", str(clip), "-map", "0:a:0",
            "-f", "wav", "-c:a", "pcm_f32le", "pipe:1"]
    piped = [a if a != str(clip) else "pipe:0" for a in args if a != "-nostdin"]
    for _ in range(repeats):
        reads, sets, cold, warm = [], [], [], []
        for _ in range(samples):
            t0 = time.perf_counter()
            data = clip.read_bytes()
            t1 = time.perf_counter()
            r.set("bench:floor", data)
            t2 = time.perf_counter()
            r.delete("bench:floor")
            reads.append((t1 - t0) * 1000)
            sets.append((t2 - t1) * 1000)
            t0 = time.perf_counter()
            proc = subprocess.Popen(args, stdout=subprocess.PIPE)
            assert proc.stdout is not None and len(proc.stdout.read(4096)) == 4096
            cold.append((time.perf_counter() - t0) * 1000)
            proc.kill()
            proc.wait()
            proc = subprocess.Popen(piped, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            time.sleep(0.3)  # started ahead of need

            def feed(p: subprocess.Popen[bytes] = proc, d: bytes = data) -> None:
                with contextlib.suppress(OSError):
                    assert p.stdin is not None
                    p.stdin.write(d)
                    p.stdin.close()

            t0 = time.perf_counter()
            feeder = threading.Thread(target=feed)
            feeder.start()
            assert proc.stdout is not None and len(proc.stdout.read(4096)) == 4096
            warm.append((time.perf_counter() - t0) * 1000)
            proc.kill()
            proc.wait()
            feeder.join()
        figs.add("read the 10-min MP3 file, median ms", statistics.median(reads))
        figs.add("SET of its 9.6 MB alone (play()'s floor), median ms", statistics.median(sets))
        figs.add("ffmpeg started on the file -> first 4 KB, median ms", statistics.median(cold))
        figs.add("ffmpeg started ahead, fed stdin -> first 4 KB, median ms", statistics.median(warm))


def conversion(clip: Path, repeats: int, figs: Figures) -> None:
    """The 10-minute MP3 to 24 kHz s16le mono: the ffmpeg CLI, pydub, echoq's convert."""
    from pydub import AudioSegment

    s = get_settings()
    for _ in range(repeats):
        t0 = time.perf_counter()
        cli = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(clip), "-ar", "24000", "-ac", "1",
                              "-f", "s16le", "pipe:1"], capture_output=True, check=True)
        t_cli = time.perf_counter() - t0
        t0 = time.perf_counter()
        raw = AudioSegment.from_file(str(clip)).set_frame_rate(24000).set_channels(1).raw_data
        t_pydub = time.perf_counter() - t0
        t0 = time.perf_counter()
        pcm = audio.convert(clip, target_rate=24000, max_bytes=s.max_audio_bytes, max_seconds=s.max_audio_seconds)
        t_echoq = time.perf_counter() - t0
        assert abs(len(pcm) - len(cli.stdout)) < 24000 * 2 and abs(len(raw) - len(cli.stdout)) < 24000 * 2
        figs.add("convert 10-min MP3, ffmpeg CLI (process), s", t_cli)
        figs.add("convert 10-min MP3, pydub, s", t_pydub)
        figs.add("convert 10-min MP3, echoq audio.convert, s", t_echoq)
        figs.add("speed ratio echoq / ffmpeg CLI", t_cli / t_echoq)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("delivery", help="worker messages/s and CPU per message beside a direct send loop")
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--burst-conversations", type=int, default=4)
    d.add_argument("--audio-seconds", type=float, default=40.0)
    d.add_argument("--latency-samples", type=int, default=0)
    d.add_argument("--conversations", type=int, default=50)
    e = sub.add_parser("enqueue", help="say() calls/s, single and batched")
    e.add_argument("--repeats", type=int, default=3)
    e.add_argument("--count", type=int, default=2000)
    e.add_argument("--batch", type=int, default=200)
    pa = sub.add_parser("pacing", help="real-time pacing of many rooms: chunk lateness, first chunk, gaps")
    pa.add_argument("--repeats", type=int, default=1)
    pa.add_argument("--rooms", type=int, default=100)
    pa.add_argument("--seconds", type=float, default=20.0)
    pa.add_argument("--threads", type=int, default=8)
    pa.add_argument("--workers", type=int, default=1, help="worker processes, each holding its share of the rooms")
    pa.add_argument("--stagger", type=float, default=0.0, help="spread the rooms' starts over this many seconds")
    pa.add_argument("--loop", choices=("on", "off"), default="on", help="ECHOQ_PACING_LOOP (off: a thread per room)")
    i = sub.add_parser("interrupt", help="interrupt() -> conversation.interrupt on the wire, 100 queued")
    i.add_argument("--repeats", type=int, default=3)
    i.add_argument("--samples", type=int, default=20)
    i.add_argument("--queued", type=int, default=100)
    lo = sub.add_parser("load", help="many conversations x many text lines from producer threads: enqueue -> wire")
    lo.add_argument("--repeats", type=int, default=1)
    lo.add_argument("--conversations", type=int, default=200)
    lo.add_argument("--texts", type=int, default=50)
    lo.add_argument("--producers", type=int, default=4)
    lo.add_argument("--mode", choices=("say", "many"), default="say")
    so = sub.add_parser("soak", help="worker RSS per room held and over a long run of real-time playing")
    so.add_argument("--minutes", type=float, default=30.0)
    so.add_argument("--rooms", type=int, default=50)
    so.add_argument("--sample-s", type=float, default=30.0)
    f = sub.add_parser("firstaudio", help="play() call and enqueue -> first chunk of MP3s, conversion anchors")
    f.add_argument("--repeats", type=int, default=3)
    f.add_argument("--samples", type=int, default=5)
    args = ap.parse_args()
    {"delivery": bench_delivery, "enqueue": bench_enqueue, "pacing": bench_pacing, "soak": bench_soak, "load": bench_load,
     "interrupt": bench_interrupt,
     "firstaudio": bench_firstaudio}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
