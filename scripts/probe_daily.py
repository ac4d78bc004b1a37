"""Print what the installed daily-python does, in the shapes echoq's test double reproduces.

    .venv/bin/python scripts/probe_daily.py            # JSON on stdout (about 25 s offline)
    .venv/bin/python scripts/probe_daily.py --write    # also store it as the double's expectations

Run it again when daily-python changes: ``tests/unit/test_fake_daily.py`` runs the same
:func:`probe` against ``tests/doubles/fake_daily.py`` and compares the result with
``tests/doubles/daily_shapes.json``. Meant to run offline (no route to Daily): the join is
expected to fail, which takes the SDK about 19–49 s. Every client is left and released, also on
Ctrl-C, because a client dropped with a join pending aborts the interpreter at exit.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

SHAPES_FILE = Path(__file__).resolve().parents[1] / "tests" / "doubles" / "daily_shapes.json"
#: A room that cannot be reached offline (and does not exist online).
PROBE_URL = "https://echoq-probe.daily.co/offline"
#: Event handler names echoq relies on.
HANDLER_NAMES = (
    "on_app_message",
    "on_call_state_updated",
    "on_error",
    "on_network_connection_status_updated",
    "on_network_stats_updated",
    "on_participant_joined",
    "on_participant_left",
    "on_participant_updated",
)
SETTLE_S = 0.5


def _short(error: Any) -> Any:
    """An SDK error string without the part that names this machine's network details."""
    if isinstance(error, str) and "(Get(" in error:
        return error.split("(Get(")[0] + "(Get(...))"
    return error


class _Recorder:
    """Collects events and completions of one client, in the order the SDK delivered them."""

    def __init__(self) -> None:
        self.log: list[list[Any]] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def add(self, *item: Any) -> None:
        with self.changed:
            self.log.append([_short(x) for x in item])
            self.changed.notify_all()

    def take(self) -> list[list[Any]]:
        with self.lock:
            out, self.log = self.log, []
        return out

    def wait_for(self, kind: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not any(item[0] == kind for item in self.log):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {kind} within {timeout:.0f}s")
                self.changed.wait(remaining)
        time.sleep(SETTLE_S)  # events that follow a completion (on_error) arrive just after it


def _handler(sdk: Any, recorder: _Recorder) -> Any:
    class Handler(sdk.EventHandler):  # type: ignore[misc, name-defined]
        def on_error(self, message: str) -> None:
            recorder.add("on_error", message)

        def on_call_state_updated(self, state: str) -> None:
            recorder.add("state", state)

    handler = Handler()
    return handler


def _order(log: list[list[Any]]) -> dict[str, Any]:
    """A log whose final ``left`` state is taken out: the SDK fires it from another thread, so it
    lands before or after the completion from one run to the next."""
    rest = [item for item in log if item != ["state", "left"]]
    return {"order": rest, "then_left": ["state", "left"] in log}


def _raises(call: Any) -> str:
    try:
        call()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "returned"


def _timed_write(target: Any, pcm: bytes, seconds: float) -> dict[str, Any]:
    t0 = time.monotonic()
    frames = target.write_frames(pcm)
    return {"frames": frames, "blocked": time.monotonic() - t0 >= 0.9 * seconds}


def probe(sdk: Any, url: str = PROBE_URL, join_timeout: float = 60.0) -> dict[str, Any]:
    """Run every observation against ``sdk`` (the ``daily`` module or the double); their shapes.

    ``sdk.Daily.init()`` must not have run yet in this process (it may run once).
    """
    sdk.Daily.init()
    shapes: dict[str, Any] = {}
    shapes["event_handler_names"] = [n for n in HANDLER_NAMES if hasattr(sdk.EventHandler, n)]

    # Devices first: they need no client.
    mics = [sdk.Daily.create_microphone_device("echoq-probe", sample_rate=24000, channels=1) for _ in range(2)]
    shapes["microphone_duplicate_name"] = "accepted" if len(mics) == 2 else "refused"
    shapes["microphone_write_not_live"] = _timed_write(mics[0], b"\0" * 48000, 1.0)
    source = sdk.CustomAudioSource(24000, 1)
    track = sdk.CustomAudioTrack(source)
    shapes["custom_track_id_is_str"] = isinstance(track.id, str) and len(track.id) == 36
    shapes["custom_source_write_100ms"] = _timed_write(source, b"\0" * 4800, 0.1)
    shapes["custom_source_write_10ms_and_a_frame"] = source.write_frames(b"\0" * 482)

    recorder = _Recorder()
    client = sdk.CallClient(event_handler=_handler(sdk, recorder))
    try:
        shapes["send_app_message_serialize_none"] = _raises(
            lambda: client.send_app_message({}, None, serialize_none=True, completion=lambda e: None)
        ).split(":")[0]
        client.send_app_message({"probe": 1}, None, completion=lambda error: recorder.add("completion", error))
        recorder.wait_for("on_error", 10.0)
        shapes["send_before_join"] = recorder.take()

        client.add_custom_audio_track("echoq-probe", track, completion=lambda error: recorder.add("completion", error))
        recorder.wait_for("completion", 10.0)
        shapes["add_custom_audio_track_not_joined"] = recorder.take()

        client.join(url, completion=lambda data, error: recorder.add("completion", data, error))
        recorder.wait_for("completion", join_timeout)
        shapes["failed_join"] = _order(recorder.take())

        client.leave(completion=lambda *args: recorder.add("completion", list(args)))
        recorder.wait_for("completion", 10.0)
        shapes["leave_after_failed_join"] = _order(recorder.take())
    finally:
        # Also on KeyboardInterrupt: a client dropped with a call pending aborts at exit.
        try:
            client.leave()
        finally:
            client.release()
    shapes["release_twice"] = _raises(client.release)
    shapes["call_after_release"] = _raises(lambda: client.send_app_message({}, None))
    return shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"store the shapes in {SHAPES_FILE}")
    parser.add_argument("--url", default=PROBE_URL, help="a room the join fails to reach")
    parser.add_argument("--join-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    sdk = importlib.import_module("daily")
    shapes = probe(sdk, args.url, args.join_timeout)
    text = json.dumps(shapes, indent=2, sort_keys=True)
    print(text)
    if args.write:
        SHAPES_FILE.write_text(text + "\n")
        print(f"wrote {SHAPES_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
