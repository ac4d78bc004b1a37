"""The echoq demo: a worker, the replica simulator and Flower speak a short script, then a report.

Run it through ``scripts/demo`` (which first runs ``scripts/setup.sh``), or directly with the
project's virtualenv: ``.venv/bin/python scripts/demo.py [--keep] [--speed 2]``.

What it does:

1. Uses Redis at ``ECHOQ_REDIS_URL``, by default ``redis://127.0.0.1:6379/14``, a database of
   its own: that database is emptied before and after the run. With ``ECHOQ_REDIS_URL`` set, it
   empties nothing and removes only the keys of the conversation it created. When no Redis
   answers on the local default port, it starts one and stops it at the end.
2. Starts ``echoq worker``, ``echoq simulate`` and ``echoq flower --no-auth`` (127.0.0.1, a free
   port) as child processes; their logs go to ``out/demo/logs/``.
3. Writes a melody with numpy (``out/demo/melody.wav``, 44.1 kHz stereo, converted by the
   worker), opens a ``loopback://`` conversation, says three lines of text, plays the melody,
   waits for each to be spoken, streams a generated clip in 20 ms pieces at real time (the
   room hears it while it is still being written), then plays a longer clip and interrupts it
   mid-way.
4. Prints a report: per utterance its kind, state, messages, enqueue-to-first-message and
   enqueue-to-sent times, how long the replica spoke, and the WAV/TXT file the simulator wrote;
   the simulator's protocol violations; what Flower saw, and its URL.
5. Stops everything it started: at the end, on Ctrl-C and on SIGTERM. ``--keep`` leaves the
   services running until Ctrl-C so you can look around in Flower.

Exit status: 0 when every utterance ended as expected and the simulator found no violation;
1 when something failed; 130/143 when stopped by Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import wave
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlparse

import numpy as np
import redis
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's producer and worker, as the children it starts use
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
#: the columns of Flower's tasks page: its defaults plus arguments and result (ids and counts only)
FLOWER_TASKS_COLUMNS = "name,uuid,state,args,result,runtime,worker,received"

SCRIPT = (
    "Hello! I am a replica, and every word I say comes from a queue.",
    "Next, a short melody, sent as audio in forty millisecond chunks.",
)
CLOSING = "That was the melody. Thank you for listening!"
CUT_LINE = "(a long chirp, interrupted mid-way)"


class Stop(BaseException):
    """Ctrl-C or SIGTERM arrived: unwind to the cleanup."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class DemoError(Exception):
    """Something the demo needs did not happen; the message says what."""


def say(line: str) -> None:
    print(line, flush=True)


# audio -----------------------------------------------------------------------------------------


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """Write float samples in [-1, 1] (shape (n,) or (n, channels)) as 16-bit PCM."""
    pcm = np.clip(samples, -1.0, 1.0)
    frames = (pcm * 32767).astype("<i2")
    channels = 1 if frames.ndim == 1 else frames.shape[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames.tobytes())
    return path


def melody(path: Path, rate: int = 44100) -> Path:
    """A short arpeggio with soft note edges, in stereo at 44.1 kHz (the worker converts it)."""
    notes = (523.25, 659.25, 783.99, 1046.5, 783.99, 659.25, 523.25)  # C5 E5 G5 C6 G5 E5 C5
    parts = []
    for i, freq in enumerate(notes):
        seconds = 0.6 if i == len(notes) - 1 else 0.3
        t = np.arange(int(seconds * rate)) / rate
        envelope = np.minimum(1.0, t / 0.01) * np.exp(-3.0 * t)
        tone = np.sin(2 * np.pi * freq * t) + 0.3 * np.sin(4 * np.pi * freq * t)
        parts.append(0.35 * envelope * tone)
    mono = np.concatenate(parts)
    return write_wav(path, np.stack([mono, mono * 0.8], axis=1), rate)


def vowel(seconds: float = 2.0, rate: int = 24000) -> bytes:
    """A sung vowel with vibrato as raw 24 kHz s16le PCM: the clip the demo streams as it is "generated"."""
    t = np.arange(int(seconds * rate)) / rate
    pitch = 196.0 * (1 + 0.02 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(a * np.sin(k * phase) for k, a in ((1, 1.0), (2, 0.5), (3, 0.35), (4, 0.15)))
    envelope = np.minimum(1.0, t / 0.05) * np.minimum(1.0, (seconds - t) / 0.2)
    return (0.2 * 32767 * envelope * voice).astype("<i2").tobytes()


def chirp(path: Path, seconds: float = 6.0, rate: int = 24000) -> Path:
    """A slow rising tone, long enough to be interrupted while the replica plays it."""
    t = np.arange(int(seconds * rate)) / rate
    return write_wav(path, 0.3 * np.sin(2 * np.pi * (220 + 40 * t) * t), rate)


# child processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the demo itself dies (even by kill -9). Linux only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 20) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


@dataclass
class Services:
    """What the demo started: processes (stopped in reverse order) and its conversation's keys."""

    logs: Path
    env: dict[str, str]
    children: list[Child] = field(default_factory=list)
    hurry: bool = False
    conversation_id: str | None = None
    utterance_ids: list[str] = field(default_factory=list)

    def start(self, name: str, argv: list[str], **env: str) -> Child:
        log_path = self.logs / f"{name}.log"
        with log_path.open("wb") as log:
            # own session: Ctrl-C reaches only the demo, which then stops the children in order
            proc = subprocess.Popen(argv, cwd=ROOT, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def check(self) -> None:
        for child in self.children:
            if not child.alive():
                raise DemoError(f"{child.name} exited with {child.proc.returncode}; its log ends:\n{child.tail()}")

    def stop_all(self, grace_s: float = 20.0) -> None:
        """SIGTERM each child (warm shutdown), wait, then SIGKILL whatever is left."""
        for child in reversed(self.children):
            if child.alive():
                with contextlib.suppress(ProcessLookupError):
                    child.proc.terminate()
        deadline = time.monotonic() + grace_s
        for child in reversed(self.children):
            while child.alive() and time.monotonic() < deadline and not self.hurry:
                time.sleep(0.05)
            if child.alive():
                say(f"  {child.name} did not stop in time: killing it")
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                child.proc.wait(5)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, services: Services | None = None) -> Any:
    """Poll ``predicate`` until it is truthy; raise :class:`DemoError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if services is not None:
            services.check()
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


# Redis -----------------------------------------------------------------------------------------


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping())
    except redis.RedisError:
        return False


def ensure_redis(url: str, services: Services) -> None:
    """Start a throwaway local redis-server as a child when nothing answers on a local URL."""
    if redis_answers(url):
        return
    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost") or not shutil.which("redis-server"):
        raise DemoError(f"Redis at {url} does not answer (run scripts/setup.sh, or set ECHOQ_REDIS_URL)")
    port = parsed.port or 6379
    say(f"• starting redis-server on 127.0.0.1:{port} (stopped at the end)")
    services.start("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no"])
    wait_until(lambda: redis_answers(url), 15, "redis-server to answer", services)


def forget(client: redis.Redis, conversation_id: str, utterance_ids: list[str]) -> None:
    """Remove the keys of the demo's conversation (when the database is not the demo's own).

    Celery's stored task results (``celery-task-meta-*``) expire on their own after an hour.
    """
    from worker import keys

    queue = keys.conv_queue(conversation_id)
    names: list[Any] = [keys.lease(conversation_id), queue, f"_kombu.binding.{queue}",
                        f"_kombu.binding_permanent.{queue}"]
    room = conversation_id  # the demo names its loopback room after its conversation
    for pattern in (f"{keys.conversation(conversation_id)}*", f"{keys.loopback_room(room)}*"):
        names += list(client.scan_iter(match=pattern, count=500))
    for uid in utterance_ids:
        names += [keys.utterance(uid), keys.blob(uid), keys.inference(uid)]
    client.delete(*names)
    client.srem(keys.CONVERSATIONS, conversation_id)
    client.srem(keys.LOOPBACK_ROOMS, room)


# the run ---------------------------------------------------------------------------------------


@dataclass
class Spoken:
    """One utterance of the script and what became of it."""

    label: str
    kind: str
    uid: str
    expect: str = "spoken"
    record: dict[str, Any] = field(default_factory=dict)
    written: tuple[float, float] | None = None  # a stream: when its first and last piece were written (time.time)


def run(args: argparse.Namespace, services: Services, redis_url: str) -> int:
    from producer.client import EchoqClient
    from worker import keys

    out: Path = args.out
    client = EchoqClient(redis_url)
    plain = redis.Redis.from_url(redis_url)
    worker_name = f"demo-{os.getpid()}@{socket.gethostname()}"
    metrics_port, flower_port = free_port(), free_port()
    flower_url = f"http://127.0.0.1:{flower_port}"

    say("• starting the replica simulator, a worker and Flower")
    sim_out = out / "sim"
    shutil.rmtree(sim_out, ignore_errors=True)
    py = sys.executable
    services.start("simulator", [py, "-m", "producer.cli", "simulate", "--out", str(sim_out), "--speed", str(args.speed)])
    services.start("worker", [py, "-m", "producer.cli", "worker", "-c", "4", "-n", worker_name],
                   ECHOQ_METRICS_PORT=str(metrics_port))
    services.start("flower", [py, "-m", "producer.cli", "flower", "--no-auth", "--address", "127.0.0.1",
                              "--port", str(flower_port)],
                   FLOWER_TASKS_COLUMNS=FLOWER_TASKS_COLUMNS, FLOWER_UNAUTHENTICATED_API="true")
    wait_until(lambda: plain.exists(keys.SIMULATOR_ALIVE), 60, "the simulator", services)
    wait_until(lambda: plain.hexists(keys.WORKERS, worker_name), 60, "the worker to report in", services)
    wait_until(lambda: _get(f"{flower_url}/healthcheck") == "OK", 60, "Flower", services)
    say(f"  worker {worker_name} · Flower {flower_url}/tasks · logs in {services.logs}")

    conversation_id = f"demo-{uuid.uuid4().hex[:8]}"
    room = conversation_id
    services.conversation_id = conversation_id
    client.open(conversation_id, f"loopback://{room}")
    wait_until(lambda: client.conversation(conversation_id).get("owner"), 30, "the worker to join the room", services)
    # The owner rings its own doorbell after joining; once Flower shows that drain task done, the
    # worker is consuming the conversation's queue (a new queue is picked up within about 1 s).
    wait_until(lambda: _flower_drained(flower_url, conversation_id), 30, "the worker to consume the room's queue",
               services)
    say(f"• opened {conversation_id} (loopback://{room}); the worker joined the room and consumes its queue")

    clip = melody(out / "melody.wav")
    script = [Spoken(f'"{SCRIPT[0]}"', "text", client.say(conversation_id, SCRIPT[0])),
              Spoken(f'"{SCRIPT[1]}"', "text", client.say(conversation_id, SCRIPT[1])),
              Spoken(f"♪ {clip.relative_to(ROOT) if clip.is_relative_to(ROOT) else clip}", "audio",
                     client.play(conversation_id, clip)),
              Spoken(f'"{CLOSING}"', "text", client.say(conversation_id, CLOSING))]
    services.utterance_ids += [item.uid for item in script]
    say(f"• queued {len(script)} utterances; the replica speaks them in order")
    for item in script:
        item.record = _wait_final(client, item, services)
        say(f"  {item.record.get('state'):<11} {item.label}")

    utterances = list(script)
    streamed = _stream_clip(client, conversation_id)
    services.utterance_ids.append(streamed.uid)
    streamed.record = _wait_final(client, streamed, services)
    say(f"  {streamed.record.get('state'):<11} {streamed.label}")
    utterances.append(streamed)

    if not args.no_interrupt:
        cut = Spoken(CUT_LINE, "audio", client.play(conversation_id, chirp(out / "chirp.wav")), expect="interrupted")
        services.utterance_ids.append(cut.uid)
        wait_until(lambda: client.status(cut.uid).get("spoken_started_at"), 30, "the replica to start the chirp",
                   services)
        time.sleep(min(1.0, 1.0 / args.speed))  # let it be heard for a moment
        client.interrupt(conversation_id)
        cut.record = _wait_final(client, cut, services)
        say(f"  {cut.record.get('state'):<11} {cut.label}")
        utterances.append(cut)

    report = settled_report(plain, room, sim_out, utterances, services)
    _print_report(utterances, plain, room, report, sim_out, flower_url, metrics_port, args.keep)
    ok = all(u.record.get("state") == u.expect for u in utterances) and report["violations"] == 0

    if args.keep:
        say(f"\nServices are running. Flower: {flower_url}/tasks  — press Ctrl-C to stop everything.")
        try:
            while True:
                services.check()
                time.sleep(0.5)
        except Stop:
            say("\n• stopping")
            return 0 if ok else 1

    client.close(conversation_id)
    wait_until(lambda: client.conversation(conversation_id).get("state") == "closed", 30,
               "the worker to leave the room", services)
    return 0 if ok else 1


def _stream_clip(client: Any, conversation_id: str, piece_ms: int = 20) -> Spoken:
    """Stream a clip in 20 ms pieces at real time, as a speech generator would hand them over."""
    pcm = vowel()
    size = 24000 * piece_ms // 1000 * 2
    pieces = [pcm[i : i + size] for i in range(0, len(pcm), size)]
    say(f"• streaming a clip as it is generated: {len(pieces)} pieces of {piece_ms} ms, one every {piece_ms} ms")
    with client.stream(conversation_id, sample_rate=24000) as stream:
        t0, first_at = time.monotonic(), time.time()
        for i, piece in enumerate(pieces[:-1]):
            time.sleep(max(0.0, t0 + i * piece_ms / 1000 - time.monotonic()))
            stream.write(piece)
        time.sleep(max(0.0, t0 + (len(pieces) - 1) * piece_ms / 1000 - time.monotonic()))
        last_at = time.time()
        stream.finish(pieces[-1])  # the last piece carries done
    return Spoken(f"≈ streamed clip, {len(pieces)} × {piece_ms} ms pieces", "stream", stream.utterance_id,
                  written=(first_at, last_at))


def _get(url: str) -> str | None:
    try:
        return requests.get(url, timeout=2).text.strip()
    except requests.RequestException:
        return None


def _wait_final(client: Any, item: Spoken, services: Services) -> dict[str, Any]:
    final = ("spoken", "interrupted", "failed", "cancelled")
    return dict(wait_until(lambda: (rec := client.status(item.uid)).get("state") in final and rec, 120,
                           f"{item.label} to be spoken", services))


def wire(client: redis.Redis, room: str) -> list[dict[str, Any]]:
    """Every message sent into the loopback room, in order."""
    from worker import keys

    return [json.loads(fields[b"data"]) for _id, fields in client.xrange(keys.loopback_room(room))]


def settled_report(client: redis.Redis, room: str, sim_out: Path, utterances: list[Spoken],
                   services: Services | None = None) -> dict[str, Any]:
    """The simulator's report once it has taken every message on the wire; ``on_wire`` is added.

    An interrupted utterance is marked interrupted *before* its ``conversation.interrupt`` goes
    out, so a report read as soon as every state was final could lack that last message (the demo
    then said one message fewer than the report and the worker's metrics): wait for it first.
    """
    if any(u.expect == "interrupted" for u in utterances):
        wait_until(lambda: any(m.get("event_type") == "conversation.interrupt" for m in wire(client, room)), 30,
                   "the interrupt message in the room", services)
    on_wire = len(wire(client, room))
    report = wait_until(lambda: (r := _simulator_report(sim_out, room, utterances))
                        and r["rooms"][room]["messages"] >= on_wire and r, 30,
                        f"the simulator's report.json to count all {on_wire} messages", services)
    return {**report, "on_wire": on_wire}


def _simulator_report(sim_out: Path, room: str, utterances: list[Spoken]) -> dict[str, Any] | None:
    """report.json once it lists a file for every utterance of the script."""
    try:
        report = json.loads((sim_out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    got = {u["inference_id"]: u for u in report.get("rooms", {}).get(room, {}).get("utterances", [])}
    if not all(got.get(u.record.get("inference_id", u.uid), {}).get("txt" if u.kind == "text" else "wav")
               for u in utterances):
        return None
    report["by_inference"] = got
    return dict(report)


def _first_messages(client: redis.Redis, room: str) -> dict[str, float]:
    """When the first message of each inference_id reached the room (the stream entry's time)."""
    from worker import keys

    first: dict[str, float] = {}
    entries: Any = client.xrange(keys.loopback_room(room))
    for entry_id, fields in entries:
        message = json.loads(fields[b"data"])
        inference_id = (message.get("properties") or {}).get("inference_id")
        if inference_id and inference_id not in first:
            first[inference_id] = int(entry_id.decode().split("-")[0]) / 1000.0
    return first


def _ms(later: Any, earlier: Any) -> str:
    try:
        return f"{(float(later) - float(earlier)) * 1000:.0f}"
    except (TypeError, ValueError):
        return "—"


def _print_report(utterances: list[Spoken], client: redis.Redis, room: str, report: dict[str, Any], sim_out: Path,
                  flower_url: str, metrics_port: int, keep: bool) -> None:
    first = _first_messages(client, room)
    rows = [("utterance", "kind", "state", "msgs", "enq→1st ms", "enq→sent ms", "spoken s", "file")]
    for u in utterances:
        rec = u.record
        inference_id = rec.get("inference_id", u.uid)
        sim = report["by_inference"].get(inference_id, {})
        path = sim.get("wav") or sim.get("txt") or "—"
        with contextlib.suppress(ValueError):
            path = str(Path(path).resolve().relative_to(ROOT))
        label = u.label if len(u.label) <= 40 else u.label[:39] + "…"
        rows.append((label, u.kind, str(rec.get("state")), str(sim.get("chunks", rec.get("chunks_sent", "—"))),
                     _ms(first.get(inference_id), rec.get("enqueued_at")), _ms(rec.get("sent_at"), rec.get("enqueued_at")),
                     f"{float(rec['duration']):.2f}" if rec.get("duration") not in (None, "", "None") else "—", path))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    say("\n" + "═" * 30 + " echoq demo report " + "═" * 30)
    for n, row in enumerate(rows):
        say("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            say("  ".join("─" * w for w in widths))
    say("")
    say(f"messages on the wire   {report['on_wire']} (the simulator took {report['rooms'][room]['messages']}; "
        f"violations: {report['violations']})")
    say(f"simulator report       {_rel(sim_out / 'report.json')}")
    for u in utterances:
        if u.written is not None:
            first_on_wire = first.get(u.record.get("inference_id", u.uid))
            ahead = f"{(u.written[1] - first_on_wire) * 1000:.0f} ms before the last piece was written" \
                if first_on_wire else "—"
            say(f"streamed               {u.record.get('pieces_in', '?')} pieces appended in "
                f"{(u.written[1] - u.written[0]):.2f} s; its first audio was in the room {ahead}")
    sent = _metric_counts(metrics_port)
    if sent:
        say("worker metrics         " + ", ".join(f"{k} {v:.0f}" for k, v in sent.items())
            + f"  (http://127.0.0.1:{metrics_port}/metrics)")
    tasks = _flower_tasks(flower_url)
    if tasks:
        say("Flower saw             " + ", ".join(f"{n} {name} {state}" for (name, state), n in sorted(tasks.items())))
    note = "" if keep else "  (stops with the demo: --keep keeps it running)"
    say(f"Flower                 {flower_url}/tasks{note}")


def _rel(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(ROOT))
    return str(path)


def _metric_counts(port: int) -> dict[str, float]:
    body = _get(f"http://127.0.0.1:{port}/metrics") or ""
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("echoq_messages_sent_total{"):
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            out[f"{kind} messages"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("echoq_utterances_total{"):
            state = line.split('state="', 1)[1].split('"', 1)[0]
            if float(line.rsplit(" ", 1)[1]):
                out[f"{state}"] = float(line.rsplit(" ", 1)[1])
    return out


def _flower_drained(flower_url: str, conversation_id: str) -> bool:
    try:
        tasks = requests.get(f"{flower_url}/api/tasks", params={"taskname": "echoq.drain", "state": "SUCCESS"},
                             timeout=5).json()
    except (requests.RequestException, ValueError):
        return False
    return any(t.get("args") == repr([conversation_id]) for t in tasks.values())


def _flower_tasks(flower_url: str) -> Counter[tuple[str, str]]:
    try:
        tasks = requests.get(f"{flower_url}/api/tasks", timeout=5).json()
    except (requests.RequestException, ValueError):
        return Counter()
    return Counter((t.get("name") or "?", t.get("state") or "?") for t in tasks.values())


# entry point ---------------------------------------------------------------------------------


@contextlib.contextmanager
def signals_stop() -> Iterator[None]:
    """SIGINT/SIGTERM raise :class:`Stop` in the main thread, so ``finally`` blocks clean up."""

    fired: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        # raise once: a second signal before the clean-up takes over (two Ctrl-C, or a signal to
        # the whole process group) could land anywhere, even in a destructor, and be lost there
        if fired:
            return
        fired.append(signum)
        raise Stop(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--keep", action="store_true", help="keep the services running until Ctrl-C (to look at Flower)")
    parser.add_argument("--speed", type=float, default=1.0, help="replica playback speed (default 1: real time)")
    parser.add_argument("--no-interrupt", action="store_true", help="skip the interrupted utterance at the end")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo", help="where WAVs, report and logs go")
    args = parser.parse_args(argv)
    if args.speed <= 0:
        parser.error("--speed must be positive")

    own_db = "ECHOQ_REDIS_URL" not in os.environ
    redis_url = os.environ.setdefault("ECHOQ_REDIS_URL", DEFAULT_REDIS_URL)
    if own_db:  # the demo's database is also its broker
        os.environ.pop("ECHOQ_BROKER_URL", None)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    services = Services(args.out / "logs", env)
    code = 1
    with signals_stop():
        try:
            say(f"echoq demo · Redis {redis_url}" + (" (the demo's own database, emptied before and after)"
                                                      if own_db else " (only the demo's keys are removed)"))
            ensure_redis(redis_url, services)
            if own_db:
                redis.Redis.from_url(redis_url).flushdb()
            code = run(args, services, redis_url)
        except Stop as stop:
            say("\n• stopping (signal received)")
            code = 128 + stop.signum
        except DemoError as exc:
            say(f"\ndemo failed: {exc}")
            code = 1
        finally:
            _cleanup(services, redis_url, own_db)
    say("• everything the demo started is stopped" + ("" if code else "; done"))
    return code


def _cleanup(services: Services, redis_url: str, own_db: bool) -> None:
    """Stop the children even if another Ctrl-C arrives meanwhile (that one only hurries it up)."""

    def hurry(_signum: int, _frame: FrameType | None) -> None:
        services.hurry = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, hurry)
    redis_child = next((c for c in services.children if c.name == "redis"), None)
    services.children = [c for c in services.children if c is not redis_child]
    services.stop_all()
    if redis_answers(redis_url):
        client = redis.Redis.from_url(redis_url)
        if own_db:
            client.flushdb()
        elif services.conversation_id:
            forget(client, services.conversation_id, services.utterance_ids)
    if redis_child is not None:
        services.children = [redis_child]
        services.stop_all()
    elif os.environ.get("ECHOQ_DEMO_STOP_REDIS") == "1":
        # scripts/demo found no Redis and scripts/setup.sh started one for this run: stop it too
        with contextlib.suppress(redis.RedisError):
            redis.Redis(host="127.0.0.1", port=6379, socket_timeout=5).shutdown(nosave=True)
        say("• stopped the redis-server that setup started for this run")


if __name__ == "__main__":
    sys.exit(main())
