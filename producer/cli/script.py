"""``echoq script`` (validate, run, status) and ``echoq schedule`` (add, list, show, edit, pause,
resume, remove, history). Registered by :func:`register`; exit codes as in :mod:`producer.cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from worker.errors import InvalidInput

from ..scripting.script import Script, ScriptError, load_script

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNKNOWN = 0, 1, 2, 3
#: line states after which progress has nothing more to show
_LINE_DONE = ("spoken", "failed", "cancelled", "interrupted")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``script`` and ``schedule`` command groups."""
    script = subparsers.add_parser("script", help="validate and run scripts (YAML or JSON)",
                                   description="Validate and run scripts: ordered lines for a conversation.")
    ssub = script.add_subparsers(dest="script_command", metavar="SUBCOMMAND")
    ssub.required = True
    p = _sub(ssub, "validate", cmd_validate, "check a script; errors name the line and the field")
    p.add_argument("file")
    p.add_argument("--no-audio-check", action="store_true", help="do not check that local audio files exist")
    p = _sub(ssub, "run", cmd_run, "run a script now and follow it line by line")
    p.add_argument("file")
    p.add_argument("--conversation", help="speak into this open conversation instead of the script's target")
    p.add_argument("--detach", action="store_true", help="return at once with the run id")
    p.add_argument("--timeout", type=float, default=None, help="stop following after this many seconds (exit 1)")
    p.add_argument("--spoken-wait", type=float, default=15.0,
                   help="after the last line is sent, wait this long for the replica to finish speaking")
    p = _sub(ssub, "status", cmd_run_status, "show a run: each line's utterance and state")
    p.add_argument("run_id")

    sched = subparsers.add_parser("schedule", help="scripts on a schedule: cron, interval or one date-time",
                                  description="Scheduled scripts, fired by `echoq beat` (RedBeat).")
    csub = sched.add_subparsers(dest="schedule_command", metavar="SUBCOMMAND")
    csub.required = True
    p = _sub(csub, "add", cmd_add, "add a schedule for a script file")
    p.add_argument("file")
    _timing_options(p)
    p.add_argument("--id", help="schedule id (default: a new random id)")
    p.add_argument("--name", help="a label shown in listings")
    p.add_argument("--conversation", help="speak into this conversation instead of the script's target")
    p.add_argument("--grace", help="run a missed firing up to this late (default ECHOQ_SCHEDULE_GRACE_S, 60s)")
    _sub(csub, "list", cmd_list, "list schedules")
    p = _sub(csub, "show", cmd_show, "show a schedule and its last run")
    p.add_argument("schedule_id")
    p = _sub(csub, "edit", cmd_edit, "change a schedule's script, timing, timezone or grace; applies at once")
    p.add_argument("schedule_id")
    p.add_argument("--file", help="a new script file")
    p.add_argument("--conversation", help="with --file: speak into this conversation")
    _timing_options(p, required=False)
    p.add_argument("--name")
    p.add_argument("--grace")
    for name, func, help_ in (("pause", cmd_pause, "stop firing until resumed"),
                              ("resume", cmd_resume, "fire again from the next slot"),
                              ("remove", cmd_remove, "delete a schedule and its history")):
        p = _sub(csub, name, func, help_)
        p.add_argument("schedule_id")
    p = _sub(csub, "history", cmd_history, "runs of a schedule: when, which utterances, how each ended")
    p.add_argument("schedule_id")
    p.add_argument("--limit", type=int, default=20)


def _sub(sub: Any, name: str, func: Any, help_: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_guarded(func))
    return p


def _timing_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--cron", help="five-field cron, e.g. '0 9 * * 1-5' (in --tz)")
    g.add_argument("--every", help="interval: seconds or '30s', '5m', '1h'")
    g.add_argument("--at", help="one date-time, ISO 8601 (naive ones are read in --tz)")
    p.add_argument("--tz", default=None, help="IANA timezone, e.g. Europe/Paris (default UTC)")


def _guarded(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except InvalidInput as exc:
            if str(exc).startswith(("no schedule", "no run")):
                print(f"echoq: {exc}", file=sys.stderr)
                return EXIT_UNKNOWN
            raise
    return run


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str) if getattr(args, "json", False) else text)


def _script(path: str, conversation: str | None, check_audio: bool = True) -> Script:
    script = load_script(path, check_audio=check_audio)
    return script.with_conversation(conversation) if conversation else script


# script --------------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        script = load_script(args.file, check_audio=not args.no_audio_check)
    except ScriptError as exc:
        if args.json:
            raise
        # one problem a line: each names the script line, the field and where it is in the file
        print(f"echoq: {exc.source}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    target = script.target.conversation_id or f"new Tavus conversation from persona {script.target.persona_id}"
    _emit(args, {"valid": True, "lines": len(script.lines), "script": script.to_dict()},
          f"{args.file}: ok, {len(script.lines)} line(s) for {target}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from ..scripting.runs import Runner

    script = _script(args.file, args.conversation)
    runner = Runner.default()
    run = runner.start(script)
    if args.detach:
        _emit(args, {"run_id": run["id"], "state": run["state"]}, run["id"])
        return EXIT_OK
    return _follow(args, runner, run["id"], len(script.lines))


def _follow(args: argparse.Namespace, runner: Any, run_id: str, total: int) -> int:
    t0 = time.monotonic()
    deadline = None if args.timeout is None else t0 + args.timeout
    shown: dict[int, set[str]] = {}
    if not args.json:
        print(f"run {run_id}: {total} line(s)", file=sys.stderr)
    finished_at: float | None = None
    while True:
        run = runner.status(run_id) or {}
        for line in run.get("lines", []):
            seen = shown.setdefault(line["n"], set())
            for step in _milestones(line):
                if step in seen:
                    continue
                seen.add(step)
                if not args.json:
                    extra = f": {line['error']}" if line.get("error") and step not in ("queued", "sent", "spoken") else ""
                    print(f"[{time.monotonic() - t0:6.1f}s] line {line['n']}/{total} {step}{extra}", flush=True)
        over = run.get("state") in ("done", "failed")
        if over and finished_at is None:
            finished_at = time.monotonic()
        lines = run.get("lines", [])
        settled = over and all(ln.get("state") in _LINE_DONE or ln.get("state") == "pending" for ln in lines)
        if settled or (finished_at is not None and time.monotonic() - finished_at >= args.spoken_wait):
            break
        if deadline is not None and time.monotonic() >= deadline:
            print(f"echoq: run {run_id} still {run.get('state')} after {args.timeout:.1f}s", file=sys.stderr)
            return EXIT_FAILED
        time.sleep(0.1)
    ok = run.get("state") == "done" and all(ln.get("state") in ("sent", "spoken") for ln in run.get("lines", []))
    _emit(args, run, f"run {run_id} {run.get('state')}" + (f": {run['error']}" if run.get("error") else ""))
    return EXIT_OK if ok else EXIT_FAILED


def _milestones(line: dict[str, Any]) -> list[str]:
    """What a line has been through so far, in order: a state passed between two polls still shows."""
    state = line.get("state", "pending")
    if state == "pending":
        return []
    steps = ["queued"]
    if line.get("sent_at") or state in ("sent", "spoken"):
        steps.append("sent")
    if state not in ("queued", "sending", "sent"):
        steps.append(state)
    return steps


def cmd_run_status(args: argparse.Namespace) -> int:
    from ..scripting.runs import Runner

    run = Runner.default().status(args.run_id)
    if run is None:
        raise InvalidInput(f"no run {args.run_id!r}")
    _emit(args, run, _run_text(run))
    return EXIT_OK


def _run_text(run: dict[str, Any]) -> str:
    head = f"{run['id']} {run.get('state')}"
    if run.get("late_s"):
        head += f" (late {run['late_s']:.1f}s)"
    if run.get("error"):
        head += f": {run['error']}"
    rows = [head] + [f"  line {ln['n']}: {ln.get('state')} {ln['utterance_id']}"
                     + (f" — {ln['error']}" if ln.get("error") else "") for ln in run.get("lines", [])]
    return "\n".join(rows)


# schedule ------------------------------------------------------------------------------------


def _store() -> Any:
    from ..scripting.schedules import Schedules

    return Schedules.default()


def _schedule_text(s: dict[str, Any]) -> str:
    return f"{s['id']}  {s['state']:<8} {s['describe']}  next: {s.get('next_run') or '-'}" + (
        f"  ({s['name']})" if s.get("name") else "")


def cmd_add(args: argparse.Namespace) -> int:
    script = _script(args.file, args.conversation, check_audio=True)
    rec = _store().add(script, cron=args.cron, every=args.every, at=args.at, tz=args.tz, schedule_id=args.id,
                       name=args.name, grace=args.grace)
    _emit(args, rec, _schedule_text(rec))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    items = _store().list()
    _emit(args, items, "\n".join(_schedule_text(s) for s in items) or "no schedules")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    rec = _store().get(args.schedule_id)
    text = _schedule_text(rec)
    if rec.get("last_run"):
        text += "\nlast run: " + _run_text(rec["last_run"])
    _emit(args, rec, text)
    return EXIT_OK


def cmd_edit(args: argparse.Namespace) -> int:
    script = _script(args.file, args.conversation) if args.file else None
    rec = _store().update(args.schedule_id, script=script, cron=args.cron, every=args.every, at=args.at, tz=args.tz,
                          name=args.name, grace=args.grace)
    _emit(args, rec, _schedule_text(rec))
    return EXIT_OK


def cmd_pause(args: argparse.Namespace) -> int:
    rec = _store().pause(args.schedule_id)
    _emit(args, rec, _schedule_text(rec))
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    rec = _store().resume(args.schedule_id)
    _emit(args, rec, _schedule_text(rec))
    return EXIT_OK


def cmd_remove(args: argparse.Namespace) -> int:
    _store().remove(args.schedule_id)
    _emit(args, {"id": args.schedule_id, "removed": True}, f"removed {args.schedule_id}")
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    store = _store()
    store.get(args.schedule_id)
    runs = store.history(args.schedule_id, limit=args.limit)
    _emit(args, runs, "\n".join(_run_text(r) for r in runs) or "no runs yet")
    return EXIT_OK
