"""Operations commands: ``echoq flower`` (monitoring) and ``echoq beat`` (the RedBeat scheduler).

:func:`register` adds them to the ``echoq`` parser; each handler takes the parsed arguments and
returns an exit code (or replaces the process, for Flower).
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import sys
from collections.abc import Mapping

from worker.settings import get_settings

#: the Celery app module, given to ``celery -A``
CELERY_APP = "worker.celery_app"
#: the environment variable Flower reads basic-auth credentials from (``user:password[,user2:pw2]``)
FLOWER_AUTH_ENV = "FLOWER_BASIC_AUTH"

_NO_AUTH_HELP = (
    f"Flower needs authentication: set {FLOWER_AUTH_ENV}=user:password in the environment "
    "(several pairs separated by commas), or pass --no-auth to run it without authentication "
    "on a loopback address for local use."
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``flower`` and ``beat`` subcommands."""
    flower = subparsers.add_parser(
        "flower",
        help="run Flower, the Celery monitor, for echoq's workers",
        description=(
            "Run Flower for the echoq Celery app. Authentication is on: basic auth from "
            f"{FLOWER_AUTH_ENV} (user:password, comma-separated for several users). "
            "--no-auth turns it off, only on a loopback address."
        ),
    )
    flower.add_argument("--port", type=int, default=5555, help="port to listen on (default: 5555)")
    flower.add_argument(
        "--address",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1; 0.0.0.0 in a container)",
    )
    flower.add_argument(
        "--no-auth",
        action="store_true",
        help="run without authentication (local use only: refused on a non-loopback address)",
    )
    flower.set_defaults(func=run_flower)

    beat = subparsers.add_parser(
        "beat",
        help="run the scheduler for scheduled batches (Celery beat with RedBeat)",
        description=(
            "Run Celery beat with the RedBeat scheduler: the schedule lives in Redis "
            "(ECHOQ_REDIS_URL) and a lock keeps one scheduler active at a time. A standby "
            "takes over within ECHOQ_BEAT_LOCK_TIMEOUT_S + ECHOQ_BEAT_MAX_INTERVAL_S seconds of "
            "the active one dying, and within ECHOQ_BEAT_MAX_INTERVAL_S of it stopping."
        ),
    )
    beat.add_argument(
        "--max-interval",
        type=float,
        default=None,
        help="longest sleep between schedule checks and lock retries, in seconds "
             "(default: ECHOQ_BEAT_MAX_INTERVAL_S)",
    )
    beat.set_defaults(func=run_beat)


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _auth_problem(value: str) -> str | None:
    """Why a FLOWER_BASIC_AUTH value is unusable, without repeating any of it; None when fine."""
    for pair in value.split(","):
        user, sep, password = pair.partition(":")
        if not (sep and user.strip() and password):
            return f"{FLOWER_AUTH_ENV} must be user:password pairs separated by commas"
    return None


def _celery_app_available() -> bool:
    try:
        return importlib.util.find_spec(CELERY_APP) is not None
    except ImportError:
        return False


def flower_argv(args: argparse.Namespace, broker: str) -> list[str]:
    """The command line that runs Flower. Credentials never appear on it: Flower reads them from
    the environment, so they stay out of ``ps`` and out of anything that logs the command."""
    argv = [sys.executable, "-m", "celery"]
    if _celery_app_available():
        argv += ["-A", CELERY_APP]
    argv += ["--broker", broker, "flower", f"--port={args.port}", f"--address={args.address}"]
    return argv


def flower_env(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> tuple[dict[str, str] | None, str | None]:
    """The environment to run Flower with, or None and the reason it must not run."""
    env = dict(environ)
    value = env.get(FLOWER_AUTH_ENV, "").strip()
    if args.no_auth:
        if not _is_loopback(args.address):
            return (
                None,
                f"--no-auth is for local use: it is refused on {args.address}; set {FLOWER_AUTH_ENV} instead",
            )
        # Explicitly off: drop any credentials so Flower does not half-apply them.
        env.pop(FLOWER_AUTH_ENV, None)
        return env, None
    if not value:
        return None, _NO_AUTH_HELP
    problem = _auth_problem(value)
    if problem:
        return None, problem
    return env, None


def run_flower(args: argparse.Namespace) -> int:
    """Replace this process with Flower; return 2 when authentication is not set up."""
    env, problem = flower_env(args, os.environ)
    if env is None:
        print(f"echoq flower: {problem}", file=sys.stderr)
        return 2
    if args.no_auth:
        print(
            "echoq flower: authentication is OFF (--no-auth); listening on a loopback address only",
            file=sys.stderr,
        )
    argv = flower_argv(args, get_settings().broker)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
    return 0  # not reached


def beat_timing(max_interval_s: float, lock_timeout_s: float) -> str | None:
    """Why a beat interval and lock timeout do not fit together, or None when they do.

    The active beat renews its lock once a tick, and a tick comes at most ``max_interval_s``
    apart: a lock that lives less than two intervals could lapse under a live beat, and a
    standby would then fire beside it (harmless for echoq's slots, which fire once, but noisy).
    """
    if lock_timeout_s < 2 * max_interval_s:
        return (f"ECHOQ_BEAT_LOCK_TIMEOUT_S ({lock_timeout_s:g}) must be at least twice the beat interval "
                f"({max_interval_s:g}): the active beat renews its lock once an interval")
    return None


def run_beat(args: argparse.Namespace) -> int:
    """Run Celery beat with RedBeat in this process, its schedule in ``settings.redis_url``."""
    settings = get_settings()
    from producer.scripting.beat import configure_redbeat
    from worker.celery_app import app

    max_interval = args.max_interval if args.max_interval is not None else settings.beat_max_interval_s
    problem = beat_timing(max_interval, settings.beat_lock_timeout_s)
    if problem:
        print(f"echoq beat: {problem}", file=sys.stderr)
        return 2
    # RedBeat's own defaults (a 300 s interval, a 1,500 s lock) leave schedules silent for up to
    # 25 minutes after the active beat is killed: the standby sleeps max_interval between lock
    # attempts and the dead beat's lock outlives it by lock_timeout. Both come from settings.
    app.conf.update(beat_max_loop_interval=max_interval, redbeat_lock_timeout=settings.beat_lock_timeout_s)
    # RedBeat keeps the schedule and its lock in Redis; without this it would use the broker URL,
    # which may be a different server or database. The key prefix (ECHOQ_REDBEAT_KEY_PREFIX) is
    # the one producers write schedule entries under; the static pump entry paces script lines.
    configure_redbeat(app, settings.redis_url, with_pump=True)
    # RedBeat, publishing the safety-net pump only when a run is overdue (see producer.scripting.scheduler)
    argv = ["beat", "--scheduler", "producer.scripting.scheduler.Scheduler", "--loglevel", settings.log_level]
    code = app.start(argv)
    return int(code or 0)
