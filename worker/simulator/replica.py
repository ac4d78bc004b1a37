"""The replica simulator: a stand-in for a Tavus replica in loopback rooms (``echoq simulate``).

It reads the app messages that :mod:`worker.transports.loopback` appends to each room's stream,
checks them against the echo protocol and the sequence rules, writes every utterance out
(``<out>/<room>/<inference_id>.wav`` or ``.txt``), plays it in real time (divided by ``speed``)
and answers on the room's event stream as a replica would::

    {"message_type": "conversation", "event_type": "conversation.replica.started_speaking",
     "conversation_id": "c1", "inference_id": "i1", "seq": 1, "turn_idx": 0}
    {"message_type": "conversation", "event_type": "conversation.replica.stopped_speaking",
     "conversation_id": "c1", "inference_id": "i1", "seq": 2, "turn_idx": 0,
     "properties": {"duration": 1.24, "interrupted": false}}

The rules, the playback and the interrupt behaviour are in :mod:`simulator.room`; the
microphone pacing figures in :mod:`simulator.mic`. Each violation is one log line, an
entry ``{"room", "inference_id", "kind", "problem", "entry_id"}`` (field ``data``) on the stream
``echoq:loopback:<room>:violations``, and a count in :meth:`Simulator.report`, which is also
kept in ``<out>/report.json``.

While it runs, ``echoq:simulator:alive`` exists (``PX 3000``, refreshed every second); loopback
transports wait for it before their first send.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from worker import keys, redisio
from worker.errors import BackendUnavailable
from worker.logs import step

from .files import safe_name, write_json, write_text, write_wav
from .mic import MicTrack
from .room import Room, Utterance

logger = logging.getLogger("echoq.simulator")

PRESENCE_TTL_MS = 3000
PRESENCE_EVERY_S = 1.0
DISCOVER_EVERY_S = 0.2
REPORT_EVERY_S = 0.5
BLOCK_S = 0.15
EVENTS_MAXLEN = 10_000

_DELETE_IF_MINE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def violations_key(room: str) -> str:
    """Stream of the protocol violations found in a loopback room (field ``data``)."""
    return f"{keys.PREFIX}:loopback:{room}:violations"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Simulator:
    """A replica in every loopback room (or only ``rooms``); :meth:`run` until ``stop`` is set.

    ``redis_client`` must return bytes (``decode_responses=False``): microphone frames are raw
    PCM. Rooms in ``echoq:loopback:rooms`` when :meth:`run` starts (or ``rooms``) are read from
    their current end unless ``from_start``; rooms that appear later are read from their first
    entry, so nothing sent right after a join is missed. ``log`` gets one line per violation and
    per utterance received (ids, counts and seconds, never text or audio); stderr by default.
    With ``idle_exit`` > 0, :meth:`run` also returns once nothing has arrived or played for
    that many seconds.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        out_dir: Path,
        *,
        speed: float = 1.0,
        max_message_bytes: int = 4096,
        rooms: list[str] | None = None,
        from_start: bool = False,
        log: Callable[[str], None] | None = None,
        idle_exit: float = 0.0,
    ) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be positive, not {speed}")
        if redis_client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("the simulator needs a Redis client with decode_responses=False (mic frames are bytes)")
        self.redis = redis_client
        self.out_dir = Path(out_dir)
        self.speed = speed
        self.max_message_bytes = max_message_bytes
        self.only_rooms = list(rooms) if rooms else None
        self.from_start = from_start
        self.idle_exit = idle_exit
        self._log = log or _stderr_line
        self._token = uuid.uuid4().hex
        self._lock = threading.RLock()
        self._rooms: dict[str, Room] = {}
        self._mics: dict[str, MicTrack] = {}
        self._cursors: dict[str, str] = {}  # stream key -> last entry id read
        self._streams: dict[str, tuple[str, str]] = {}  # stream key -> (room, "echo" | "mic")
        self._dirty = True
        self._mic_dirty: set[str] = set()
        self._last_activity = time.monotonic()

    # -- public ------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Serve the rooms until ``stop`` is set (or the idle limit); then clean up and report."""
        t0 = time.monotonic()
        try:
            self._discover(initial=True)
            self._refresh_presence()
        except redis.RedisError as exc:
            raise BackendUnavailable(f"replica simulator cannot use Redis: {exc}") from exc
        step(logger, "simulator.started", rooms=len(self._rooms), speed=self.speed, out=str(self.out_dir))
        next_presence = next_discover = next_report = time.monotonic()
        try:
            while not stop.is_set():
                now = time.monotonic()
                try:
                    if now >= next_presence:
                        self._refresh_presence()
                        next_presence = now + PRESENCE_EVERY_S
                    if now >= next_discover:
                        self._discover(initial=False)
                        next_discover = now + DISCOVER_EVERY_S
                    self._read_once(self._wait_budget(now), stop)
                    self._tick(time.monotonic())
                except redis.RedisError as exc:
                    logger.warning("simulator Redis error, retrying: %s", exc)
                    stop.wait(0.5)
                    continue
                now = time.monotonic()
                if self._dirty and now >= next_report:
                    self._write_outputs()
                    next_report = now + REPORT_EVERY_S
                if self.idle_exit and now - self._last_activity >= self.idle_exit and not self._busy():
                    step(logger, "simulator.idle_exit", idle_s=now - self._last_activity)
                    break
        finally:
            self._shutdown()
            step(logger, "simulator.stopped", duration_s=time.monotonic() - t0)

    def report(self) -> dict[str, Any]:
        """What has been received so far, per room; the same as ``<out>/report.json``."""
        with self._lock:
            rooms: dict[str, Any] = {}
            for name, room in self._rooms.items():
                mic = self._mics.get(name)
                rooms[name] = {
                    "messages": room.messages,
                    "violations": [v.as_dict() for v in room.violations],
                    "utterances": [u.as_dict() for u in room.utterances.values()],
                    "mic": mic.as_dict(str(self._room_dir(name) / "mic.wav")) if mic and mic.frames else None,
                }
            return {
                "rooms": rooms,
                "messages": sum(r.messages for r in self._rooms.values()),
                "violations": sum(len(r.violations) for r in self._rooms.values()),
            }

    # -- the loop ----------------------------------------------------------------------------

    def _discover(self, *, initial: bool) -> None:
        if self.only_rooms is not None:
            names = set(self.only_rooms)
        else:
            members: Any = self.redis.smembers(keys.LOOPBACK_ROOMS)
            names = {_text(n) for n in members}
        for name in sorted(names - set(self._rooms)):
            with self._lock:
                self._rooms[name] = Room(name, speed=self.speed, max_message_bytes=self.max_message_bytes)
            for stream, kind in ((keys.loopback_room(name), "echo"), (keys.loopback_mic(name), "mic")):
                self._streams[stream] = (name, kind)
                self._cursors[stream] = self._start_id(stream) if initial and not self.from_start else "0-0"
            step(logger, "simulator.room", room=name, from_start=not initial or self.from_start)

    def _start_id(self, stream: str) -> str:
        last: Any = self.redis.xrevrange(stream, count=1)
        return _text(last[0][0]) if last else "0-0"

    def _refresh_presence(self) -> None:
        self.redis.set(keys.SIMULATOR_ALIVE, self._token, px=PRESENCE_TTL_MS)

    def _wait_budget(self, now: float) -> float:
        with self._lock:
            deadlines = [d for r in self._rooms.values() if (d := r.next_deadline()) is not None]
        return max(0.0, min([BLOCK_S, *(d - now for d in deadlines)]))

    def _read_once(self, wait: float, stop: threading.Event) -> None:
        if not self._cursors:
            stop.wait(wait)
            return
        block = int(wait * 1000)
        # BLOCK 0 would wait forever: when a playback deadline is due, read without blocking
        batches: Any = self.redis.xread(self._cursors, count=500, block=block if block > 0 else None)  # type: ignore[arg-type]
        now = time.monotonic()
        for stream_b, entries in batches or []:
            stream = _text(stream_b)
            room_name, kind = self._streams[stream]
            for entry_b, fields in entries:
                entry_id = _text(entry_b)
                self._cursors[stream] = entry_id
                with self._lock:
                    if kind == "echo":
                        self._on_message(self._rooms[room_name], entry_id, fields, now)
                    else:
                        self._on_mic_frame(room_name, entry_id, fields)
                self._last_activity = now
                self._dirty = True

    def _on_message(self, room: Room, entry_id: str, fields: dict[bytes, bytes], now: float) -> None:
        try:
            message = json.loads(fields[b"data"])
        except (KeyError, ValueError):
            room.messages += 1
            room.violation(None, "invalid", "entry has no JSON in field data", entry_id)
            return
        room.handle(message, now, entry_id)

    def _on_mic_frame(self, room_name: str, entry_id: str, fields: dict[bytes, bytes]) -> None:
        room = self._rooms[room_name]
        try:
            pcm = fields[b"pcm"]
            rate = int(fields[b"sample_rate"])
        except (KeyError, ValueError):
            room.violation(None, "mic", "mic frame without pcm or an integer sample_rate", entry_id)
            return
        try:
            t = float(fields[b"t"])
        except (KeyError, ValueError):
            t = int(entry_id.split("-")[0]) / 1000.0  # when the sender gave no time, Redis's
        problem = self._mics.setdefault(room_name, MicTrack()).add(pcm, rate, t)
        if problem:
            room.violation(None, "mic", problem, entry_id)
        self._mic_dirty.add(room_name)

    def _tick(self, now: float) -> None:
        """Advance every player, then publish what the rooms produced."""
        with self._lock:
            outputs = []
            for room in self._rooms.values():
                room.advance(now)
                if room.events or room.new_violations or room.finished:
                    outputs.append((room, room.events, room.new_violations, room.finished))
                    room.events, room.new_violations, room.finished = [], [], []
        for room, events, violations, finished in outputs:
            self._dirty = True
            if events:
                self._last_activity = now
            for v in violations:
                self._log(f"violation room={v.room} inference_id={v.inference_id} kind={v.kind!r} problem={v.problem!r}")
                self.redis.xadd(violations_key(room.name), {"data": json.dumps(v.as_dict())}, maxlen=EVENTS_MAXLEN)
            for utt in finished:
                self._write_utterance(room.name, utt)
            for event in events:
                self.redis.xadd(keys.loopback_events(room.name), {"data": json.dumps(event)}, maxlen=EVENTS_MAXLEN)
            if events or violations:
                self._expire_with_room(room.name)

    def _expire_with_room(self, room: str) -> None:
        """A closed conversation's room stream expires (ECHOQ_RETENTION_S); what the replica
        writes into that room afterwards expires with it instead of staying for ever."""
        ttl_ms = int(self.redis.pttl(keys.loopback_room(room)))
        if ttl_ms > 0:
            for key in (keys.loopback_events(room), violations_key(room)):
                self.redis.pexpire(key, ttl_ms, lt=True)

    def _busy(self) -> bool:
        with self._lock:
            return any(r.busy for r in self._rooms.values())

    # -- files ---------------------------------------------------------------------------

    def _room_dir(self, room: str) -> Path:
        return self.out_dir / safe_name(room)

    def _write_utterance(self, room: str, utt: Utterance, *, unfinished: bool = False) -> None:
        base = self._room_dir(room) / safe_name(utt.inference_id)
        if utt.modality == "audio":
            path = base.with_name(base.name + ".wav")
            write_wav(path, bytes(utt.pcm), utt.sample_rate or 16000)
        else:
            path = base.with_name(base.name + ".txt")
            write_text(path, utt.text)
        with self._lock:
            utt.path = str(path)
        state = "unfinished" if unfinished else ("interrupted" if utt.cut else "done")
        self._log(
            f"utterance room={room} inference_id={utt.inference_id} modality={utt.modality} "
            f"chunks={utt.chunks} seconds={utt.seconds:.2f} violations={utt.violations} {state}"
        )

    def _write_outputs(self) -> None:
        with self._lock:
            mics = [(name, bytes(self._mics[name].pcm), self._mics[name].sample_rate) for name in self._mic_dirty]
            self._mic_dirty.clear()
            self._dirty = False
        for name, pcm, rate in mics:
            write_wav(self._room_dir(name) / "mic.wav", pcm, rate or 16000)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.out_dir / "report.json", self.report())

    def _shutdown(self) -> None:
        """Publish what is pending, write partial utterances and the report, leave the rooms."""
        try:
            self._tick(time.monotonic())
        except redis.RedisError as exc:
            logger.warning("simulator could not publish its last events: %s", exc)
        with self._lock:
            partial = [(room.name, utt) for room in self._rooms.values() for utt in room.open_utterances()]
        for name, utt in partial:
            self._write_utterance(name, utt, unfinished=True)
        self._write_outputs()
        try:
            self.redis.eval(_DELETE_IF_MINE, 1, keys.SIMULATOR_ALIVE, self._token)
        except redis.RedisError as exc:
            logger.warning("simulator could not remove its presence key: %s", exc)


# -- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``echoq simulate``."""
    parser.add_argument("--out", type=Path, required=True, help="directory for WAV/text files and report.json")
    parser.add_argument("--speed", type=float, default=1.0, help="playback speed; 2 plays twice as fast as real time")
    parser.add_argument("--room", action="append", dest="rooms", metavar="NAME", help="serve only this room (repeatable)")
    parser.add_argument("--from-start", action="store_true", help="also read what rooms already hold")
    parser.add_argument("--redis-url", default=None, help="Redis URL (default: ECHOQ_REDIS_URL)")
    parser.add_argument("--idle-exit", type=float, default=0.0, metavar="SECONDS", help="exit after this long with nothing to do")
    parser.add_argument("--max-message-bytes", type=int, default=None, help="largest valid message (default: the setting)")


def _cli_line(line: str) -> None:
    print(line, file=sys.stderr if line.startswith("violation") else sys.stdout, flush=True)


def run_cli(args: argparse.Namespace) -> int:
    """Run ``echoq simulate`` until Ctrl-C, SIGTERM or the idle limit; the exit code."""
    from worker.logs import setup_logging
    from worker.settings import get_settings

    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    url = args.redis_url or settings.redis_url
    if args.speed <= 0:
        print("echoq simulate: --speed must be positive", file=sys.stderr)
        return 2
    client = redisio.connect(url, socket_connect_timeout=5, health_check_interval=30)
    try:
        client.ping()
    except redis.RedisError as exc:
        print(f"echoq simulate: cannot reach Redis at {url}: {exc}", file=sys.stderr)
        return 1
    simulator = Simulator(
        client,
        args.out,
        speed=args.speed,
        max_message_bytes=args.max_message_bytes or settings.max_message_bytes,
        rooms=args.rooms,
        from_start=args.from_start,
        log=_cli_line,
        idle_exit=args.idle_exit,
    )
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        simulator.run(stop)
    except BackendUnavailable as exc:
        print(f"echoq simulate: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        client.close()
    report = simulator.report()
    print(f"simulator stopped: messages={report['messages']} violations={report['violations']} report={args.out / 'report.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m worker.simulator``: the same options as ``echoq simulate``."""
    parser = argparse.ArgumentParser(prog="python -m worker.simulator", description="Tavus replica simulator for loopback rooms")
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


