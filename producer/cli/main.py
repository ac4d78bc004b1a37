"""The ``echoq`` command line.

Exit codes: 0 ok; 1 the utterance failed (``--wait``) or a wait timed out; 2 bad input or usage;
3 unknown conversation or utterance; 5 Redis unreachable.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from redis.connection import parse_url

from worker.errors import (
    AudioError,
    BackendUnavailable,
    ConfigError,
    EchoqError,
    InvalidInput,
    UnknownConversation,
)
from worker.settings import get_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNKNOWN, EXIT_BACKEND = 0, 1, 2, 3, 5
#: the URL schemes Redis's client (and so Celery's broker) accepts
REDIS_SCHEMES = ("redis", "rediss", "unix")

#: modules that add their own subcommands with ``register(subparsers)``
COMMAND_MODULES = ("producer.cli.tavus", "producer.cli.ops", "producer.cli.api", "producer.cli.script")


def _client() -> Any:
    from ..client import EchoqClient

    return EchoqClient()


def _print(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if getattr(args, "json", False) else text)


# commands ------------------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    s = get_settings()
    name = args.name or f"echoq-{os.getpid()}@{socket.gethostname()}"
    argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-P", "threads",
            "-c", str(args.concurrency or s.worker_concurrency), "-Q", "echoq.control", "-n", name,
            "--without-gossip", "--without-mingle", "-E", "--loglevel", args.loglevel or s.log_level,
            # scheduled scripts are producer work that runs in the worker process; the worker
            # package itself never imports producer
            "--include", "producer.scripting.tasks"]
    sys.stdout.flush()
    os.execv(sys.executable, argv)
    return EXIT_OK  # not reached


def cmd_simulate(args: argparse.Namespace) -> int:
    from worker.simulator import replica as simulator

    return int(simulator.run_cli(args))


def cmd_open(args: argparse.Namespace) -> int:
    conv = _client().open(args.conversation_id, args.url, mode=args.mode, tavus_conversation_id=args.tavus_id)
    wire = f", Tavus id {conv['wire_id']}" if conv.get("wire_id") not in (None, args.conversation_id) else ""
    _print(args, conv, f"opened {args.conversation_id} ({conv.get('mode')}{wire}) -> {conv.get('url')}")
    if conv.get("waiting"):
        print(f"echoq open: warning: {args.conversation_id} waits for a worker: {conv['waiting']}", file=sys.stderr)
    return EXIT_OK


def cmd_close(args: argparse.Namespace) -> int:
    _client().close(args.conversation_id)
    _print(args, {"conversation_id": args.conversation_id, "closing": True}, f"closing {args.conversation_id}")
    return EXIT_OK


def _print_record(args: argparse.Namespace, record: dict[str, Any]) -> int:
    from .human import record_text

    _print(args, record, record_text(record))
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    return _print_record(args, _client().conversation(args.conversation_id))


def cmd_say(args: argparse.Namespace) -> int:
    client = _client()
    uid = client.say(args.conversation_id, args.text, utterance_id=args.id, inference_id=args.inference_id)
    return _after_enqueue(client, args, uid)


def cmd_play(args: argparse.Namespace) -> int:
    client = _client()
    fmt, source_rate = ("raw", args.raw_rate) if args.raw_rate else (args.format, args.source_rate)
    if args.file == "-":
        # stdin is streamed as it arrives: the replica speaks while the pipe is still being written
        from ..streams import pipe

        uid = pipe(client, args.conversation_id, sys.stdin.buffer, sample_rate=args.sample_rate,
                   source_rate=source_rate, channels=args.channels, format=fmt or "auto",
                   utterance_id=args.id, inference_id=args.inference_id)
    else:
        uid = client.play(args.conversation_id, args.file, sample_rate=args.sample_rate, source_rate=source_rate,
                          channels=args.channels, format=fmt, utterance_id=args.id, inference_id=args.inference_id)
    return _after_enqueue(client, args, uid)


def _after_enqueue(client: Any, args: argparse.Namespace, uid: str) -> int:
    if not args.wait:
        _print(args, {"utterance_id": uid, "state": "queued"}, uid)
        return EXIT_OK
    from worker.chunks import progress_text

    shown = [""]
    tty = sys.stderr.isatty()

    def progress(rec: dict[str, Any]) -> None:
        if args.json or rec.get("kind") != "audio":
            return
        count = progress_text(rec.get("chunks_sent") or 0, rec.get("chunks_total"), rec.get("chunks_estimate"))
        if count != shown[0]:
            shown[0] = count
            line = f"{uid}: {rec.get('state')} {count} chunks"
            # on a terminal the line is rewritten in place; \033[K clears what a longer one left
            print(("\r" + line + "\033[K") if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    try:
        rec = client.wait(uid, timeout=args.timeout, progress=progress)
    except TimeoutError as exc:
        print(f"\nechoq: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if tty and shown[0] and not args.json:
        print(file=sys.stderr)
    _print(args, rec, f"{uid} {rec.get('state')}" + (f": {rec['error']}" if rec.get("error") else ""))
    return EXIT_OK if rec.get("state") in ("sent", "spoken") else EXIT_FAILED


def cmd_interrupt(args: argparse.Namespace) -> int:
    cancelled = _client().interrupt(args.conversation_id)
    _print(args, {"conversation_id": args.conversation_id, "cancelled": cancelled},
           f"interrupted {args.conversation_id}; {cancelled} queued utterance(s) cancelled")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    return _print_record(args, _client().status(args.utterance_id))


# parser --------------------------------------------------------------------------------------


def _add(sub: Any, name: str, func: Callable[[argparse.Namespace], int], help_: str,
         json_flag: bool = True) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
    if json_flag:
        p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=func)
    return p


def _utterance_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id", help="utterance id (default: a new uuid); enqueuing the same id twice adds it once")
    p.add_argument("--inference-id", help="inference_id on the wire (default: the utterance id)")
    p.add_argument("--wait", action="store_true", help="block until the utterance is sent; exit 1 if it failed")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echoq",
        description="Script what a Tavus replica says: queue text and audio into echo-mode conversations.",
        epilog="Settings come from ECHOQ_* environment variables (see .env.example). "
               "Exit codes: 0 ok, 1 failed or timed out, 2 bad input, 3 unknown conversation/utterance, "
               "5 Redis unreachable.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = _add(sub, "worker", cmd_worker, "run a worker: holds room sessions and sends utterances", json_flag=False)
    p.add_argument("--concurrency", "-c", type=int, help="threads (default ECHOQ_WORKER_CONCURRENCY)")
    p.add_argument("--name", "-n", help="Celery node name (default echoq-<pid>@<host>)")
    p.add_argument("--loglevel", "-l", help="log level (default ECHOQ_LOG_LEVEL)")

    p = _add(sub, "simulate", cmd_simulate, "run the replica simulator for loopback:// rooms", json_flag=False)
    try:
        from worker.simulator import replica as simulator

        simulator.add_arguments(p)
    except ImportError:
        pass

    p = _add(sub, "open", cmd_open, "open a conversation so a worker joins its room")
    p.add_argument("conversation_id")
    p.add_argument("--url", required=True, help="conversation_url (https://…daily.co/…) or loopback://NAME; "
                   "a private room's meeting token may ride as ?t=TOKEN (it is sealed, never shown)")
    p.add_argument("--mode", choices=("echo", "microphone"), default="echo",
                   help="echo: app messages (default); microphone: audio as a microphone track")
    p.add_argument("--tavus-id", help="Tavus's conversation_id, sent on the wire (default: the last segment of "
                   "an https URL's path; it must agree with it)")

    p = _add(sub, "close", cmd_close, "close a conversation: send what is queued, then leave")
    p.add_argument("conversation_id")

    p = _add(sub, "show", cmd_show, "show a conversation: owner, backlog, current utterance")
    p.add_argument("conversation_id")

    p = _add(sub, "say", cmd_say, "queue text for the replica to speak (text echo)")
    p.add_argument("conversation_id")
    p.add_argument("text")
    _utterance_options(p)

    p = _add(sub, "play", cmd_play, "queue an audio file (or http(s) URL) for the replica to lip-sync (audio echo)")
    p.add_argument("conversation_id")
    p.add_argument("file", help="audio file (wav, mp3, ogg, flac, m4a, webm, raw PCM), http(s) URL, or - to stream "
                                "stdin as it arrives (raw PCM with --raw-rate; otherwise any format ffmpeg reads from a pipe)")
    p.add_argument("--sample-rate", type=int, choices=(16000, 24000), default=None,
                   help="rate sent to the replica (default ECHOQ_DEFAULT_SAMPLE_RATE, 24000)")
    p.add_argument("--format", help="input format when it cannot be told from the file (raw for s16le PCM)")
    p.add_argument("--source-rate", type=int, help="sample rate of raw PCM input")
    p.add_argument("--raw-rate", type=int, help="the input is raw s16le PCM at this rate (--format raw --source-rate N)")
    p.add_argument("--channels", type=int, default=1, help="channels of raw PCM input (default 1)")
    _utterance_options(p)

    p = _add(sub, "interrupt", cmd_interrupt, "stop what the replica is saying and drop what is queued")
    p.add_argument("conversation_id")

    p = _add(sub, "status", cmd_status, "show an utterance: state, chunks, timings, error")
    p.add_argument("utterance_id")

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def _check_settings() -> None:
    """Refuse bad ``ECHOQ_*`` settings in one line before any command runs (exit 2), instead
    of a traceback from deep inside Redis's client or Celery."""
    try:
        settings = get_settings()
    except ValidationError as exc:
        problems = "; ".join(f"ECHOQ_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"bad settings: {problems}") from None
    for name, url in (("ECHOQ_REDIS_URL", settings.redis_url), ("ECHOQ_BROKER_URL", settings.broker_url)):
        if url is None:
            continue
        # the URL itself is never shown: it may carry a password
        if url.split("://", 1)[0] not in REDIS_SCHEMES:
            raise ConfigError(f"{name} is not a Redis URL: it must start with redis://, rediss:// or unix://")
        try:
            parse_url(url)
        except ValueError as exc:
            reason = "its port is not a number" if "port" in str(exc).lower() else "Redis's client cannot parse it"
            raise ConfigError(f"{name} is not a usable Redis URL: {reason}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_settings()
        return int(args.func(args))
    except EchoqError as exc:
        print(f"echoq: {exc}", file=sys.stderr)
        return _exit_status(exc)
    except KeyboardInterrupt:
        return 130


def _exit_status(exc: EchoqError) -> int:
    """The exit status for an echoq error: 2 bad input or settings, 3 unknown thing, 5 Redis away, 1 else."""
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    if isinstance(exc, UnknownConversation):
        return EXIT_UNKNOWN
    if isinstance(exc, InvalidInput | AudioError):
        return EXIT_UNKNOWN if str(exc).startswith("no utterance") else EXIT_USAGE
    if isinstance(exc, BackendUnavailable):
        return EXIT_BACKEND
    return EXIT_FAILED


