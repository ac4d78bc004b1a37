"""The replica simulator against a real Redis: rules, reassembly, playback events, mic, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import redis

from tests.integration import conftest as integration
from worker import echo, keys
from worker.simulator.replica import Simulator, add_arguments, run_cli, violations_key
from worker.simulator.room import text_seconds

pytestmark = pytest.mark.redis

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
CONV = "conv-1"


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 15.0) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` at the deadline."""
    return cast(T, integration.wait_for(check, timeout, 0.02, what))


def pcm_bytes(n: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed * 7 + (i >> 8)) % 256 for i in range(n))


def audio_messages(iid: str, pcm: bytes, rate: int = 16000, chunk: int = 1280, *, done: bool = True) -> list[dict[str, Any]]:
    parts = [pcm[i : i + chunk] for i in range(0, len(pcm), chunk)]
    return [
        echo.audio_echo(CONV, part, rate, iid, done and i == len(parts) - 1, max_bytes=1 << 22)
        for i, part in enumerate(parts)
    ]


def send(r: redis.Redis, room: str, *messages: dict[str, Any]) -> None:
    for message in messages:
        r.xadd(keys.loopback_room(room), {"data": echo.encode(message)})


def join(r: redis.Redis, room: str) -> None:
    r.sadd(keys.LOOPBACK_ROOMS, room)


def events(r: redis.Redis, room: str) -> list[dict[str, Any]]:
    entries: Any = r.xrange(keys.loopback_events(room))
    return [json.loads(fields[b"data"]) for _, fields in entries]


def stopped_event(r: redis.Redis, room: str, iid: str) -> dict[str, Any] | None:
    for event in events(r, room):
        if event["event_type"] == echo.STOPPED_SPEAKING and event["inference_id"] == iid:
            return event
    return None


def violation_kinds(r: redis.Redis, room: str) -> list[str]:
    entries: Any = r.xrange(violations_key(room))
    return [json.loads(fields[b"data"])["kind"] for _, fields in entries]


class Running:
    """A simulator running in a thread."""

    def __init__(self, r: redis.Redis, out: Path, **kwargs: Any) -> None:
        self.lines: list[str] = []
        self.sim = Simulator(r, out, log=self.lines.append, **kwargs)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sim.run, args=(self.stop,), daemon=True)
        self.thread.start()
        wait_for(lambda: r.exists(keys.SIMULATOR_ALIVE), "the presence key")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()

    def utterance(self, room: str, iid: str) -> dict[str, Any] | None:
        for utt in self.sim.report()["rooms"].get(room, {}).get("utterances", []):
            if utt["inference_id"] == iid:
                return dict(utt)
        return None


@pytest.fixture
def start(redis_client: redis.Redis, tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def _start(**kwargs: Any) -> Running:
        kwargs.setdefault("speed", 40.0)
        running = Running(redis_client, tmp_path / "out", **kwargs)
        started.append(running)
        return running

    yield _start
    for running in started:
        running.close()


def test_audio_utterance_is_reassembled_and_played(redis_client: redis.Redis, start: Callable[..., Running], tmp_path: Path) -> None:
    sim = start()
    join(redis_client, "r1")
    pcm = pcm_bytes(32000)  # 1 s at 16 kHz
    send(redis_client, "r1", *audio_messages("inf-a", pcm))

    stopped = wait_for(lambda: stopped_event(redis_client, "r1", "inf-a"), "stopped_speaking")
    evs = events(redis_client, "r1")
    assert [e["event_type"] for e in evs] == [echo.STARTED_SPEAKING, echo.STOPPED_SPEAKING]
    started = evs[0]
    assert started == {
        "message_type": "conversation",
        "event_type": echo.STARTED_SPEAKING,
        "conversation_id": CONV,
        "inference_id": "inf-a",
        "seq": 1,
        "turn_idx": 0,
    }
    assert stopped["seq"] == 2 and stopped["turn_idx"] == 0 and stopped["conversation_id"] == CONV
    assert stopped["properties"]["interrupted"] is False
    assert stopped["properties"]["duration"] == pytest.approx(1.0, abs=0.001)

    wav_path = tmp_path / "out" / "r1" / "inf-a.wav"
    with wave.open(str(wav_path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 16000)
        assert wav.readframes(wav.getnframes()) == pcm

    utt = wait_for(lambda: sim.utterance("r1", "inf-a"), "the report entry")
    assert utt["chunks"] == 25 and utt["bytes"] == 32000 and utt["sample_rate"] == 16000
    assert utt["done"] is True and utt["interrupted"] is False and utt["wav"] == str(wav_path)
    assert any("inference_id=inf-a" in line and "chunks=25" in line for line in sim.lines)


def test_text_utterance_writes_txt_and_events(redis_client: redis.Redis, start: Callable[..., Running], tmp_path: Path) -> None:
    sim = start()
    join(redis_client, "r1")
    text = "Hello there, this is a scripted replica line."
    send(redis_client, "r1", echo.text_echo(CONV, text, "inf-t", max_bytes=4096))

    stopped = wait_for(lambda: stopped_event(redis_client, "r1", "inf-t"), "stopped_speaking")
    assert stopped["properties"] == {"duration": pytest.approx(text_seconds(text), abs=0.001), "interrupted": False}
    assert (tmp_path / "out" / "r1" / "inf-t.txt").read_text() == text
    utt = wait_for(lambda: sim.utterance("r1", "inf-t"), "the report entry")
    assert utt["modality"] == "text" and utt["text"] == text and utt["txt"].endswith("inf-t.txt")
    assert all(text not in line for line in sim.lines)


def _bad(mutate: Callable[[dict[str, Any]], None], pcm: bytes = b"\0\0" * 160) -> dict[str, Any]:
    message = echo.audio_echo(CONV, pcm, 16000, "inf-bad", True, max_bytes=1 << 22)
    mutate(message["properties"])
    return message


@pytest.mark.parametrize(
    ("messages", "kind", "problem"),
    [
        (audio_messages("a", pcm_bytes(640), chunk=320, done=False)[:1] + audio_messages("b", pcm_bytes(640)), "interleaved", ""),
        (audio_messages("a", pcm_bytes(640)) + audio_messages("a", pcm_bytes(320)), "after done", ""),
        (
            audio_messages("a", pcm_bytes(640)) + audio_messages("b", pcm_bytes(640)) + audio_messages("a", pcm_bytes(320)),
            "reused inference_id",
            "",
        ),
        (
            [*audio_messages("a", pcm_bytes(640), done=False), echo.interrupt(CONV), *audio_messages("a", pcm_bytes(320))],
            "after interrupt",
            "",
        ),
        (audio_messages("a", pcm_bytes(640), done=False) + audio_messages("a", pcm_bytes(640), rate=24000), "sample_rate changed", ""),
        ([_bad(lambda p: p.update(done="true"))], "invalid", "properties.done"),
        ([_bad(lambda p: p.update(sample_rate=44100))], "invalid", "sample_rate"),
        ([_bad(lambda p: None, pcm=b"\0" * 4000)], "invalid", "over 4096"),
    ],
    ids=["interleaved", "after-done", "reused-id", "after-interrupt", "rate-change", "done-string", "rate-44100", "oversize"],
)
def test_violations_are_detected(
    redis_client: redis.Redis, start: Callable[..., Running], messages: list[dict[str, Any]], kind: str, problem: str
) -> None:
    sim = start()
    join(redis_client, "rv")
    send(redis_client, "rv", *messages)
    wait_for(lambda: kind in violation_kinds(redis_client, "rv"), f"a {kind!r} violation")
    report = wait_for(lambda: (rep := sim.sim.report())["violations"] and rep, "the report to count it")
    found = [v for v in report["rooms"]["rv"]["violations"] if v["kind"] == kind]
    assert found and problem in found[0]["problem"]
    assert any(line.startswith("violation room=rv") and kind in line for line in sim.lines)


def test_valid_stream_has_no_violations(redis_client: redis.Redis, start: Callable[..., Running]) -> None:
    sim = start()
    join(redis_client, "ok")
    send(redis_client, "ok", *audio_messages("a", pcm_bytes(3200)), *audio_messages("b", pcm_bytes(3200), rate=24000))
    wait_for(lambda: stopped_event(redis_client, "ok", "b"), "the second utterance to finish")
    report = sim.sim.report()
    assert report["violations"] == 0 and report["messages"] == 6
    assert [u["turn_idx"] for u in report["rooms"]["ok"]["utterances"]] == [0, 1]


def test_interrupt_stops_current_and_drops_queued(redis_client: redis.Redis, start: Callable[..., Running]) -> None:
    sim = start(speed=1.0, max_message_bytes=1 << 22)
    join(redis_client, "ri")
    long_pcm = pcm_bytes(16000 * 2 * 30)  # 30 s: still playing when the interrupt arrives
    send(redis_client, "ri", *audio_messages("long", long_pcm, chunk=64000), *audio_messages("queued", pcm_bytes(3200)))
    send(redis_client, "ri", echo.text_echo(CONV, "queued text", "queued-text", max_bytes=4096))
    wait_for(lambda: any(e["inference_id"] == "long" for e in events(redis_client, "ri")), "started_speaking")
    send(redis_client, "ri", echo.interrupt(CONV))

    stopped = wait_for(lambda: stopped_event(redis_client, "ri", "long"), "the interrupted stop")
    assert stopped["properties"]["interrupted"] is True
    assert 0 <= stopped["properties"]["duration"] < 30

    # an utterance after the interrupt plays next: the dropped ones would have come before it
    send(redis_client, "ri", echo.text_echo(CONV, "after", "after", max_bytes=4096))
    wait_for(lambda: stopped_event(redis_client, "ri", "after"), "the next utterance")
    played = [e["inference_id"] for e in events(redis_client, "ri")]
    assert played == ["long", "long", "after", "after"]
    for iid in ("queued", "queued-text"):
        utt = sim.utterance("ri", iid)
        assert utt is not None and utt["interrupted"] is True and utt["played"] == 0 and utt["done"] is True
    assert sim.sim.report()["violations"] == 0


def test_interrupt_cuts_an_unfinished_utterance(redis_client: redis.Redis, start: Callable[..., Running], tmp_path: Path) -> None:
    sim = start()
    join(redis_client, "rc")
    pcm = pcm_bytes(6400)
    send(redis_client, "rc", *audio_messages("cut", pcm, done=False), echo.interrupt(CONV))
    stopped = wait_for(lambda: stopped_event(redis_client, "rc", "cut"), "the interrupted stop")
    assert stopped["properties"]["interrupted"] is True
    utt = wait_for(lambda: (u := sim.utterance("rc", "cut")) and u["wav"] and u, "the partial WAV")
    assert utt["done"] is False and utt["interrupted"] is True
    with wave.open(str(tmp_path / "out" / "rc" / "cut.wav"), "rb") as wav:
        assert wav.readframes(wav.getnframes()) == pcm


def test_presence_key_while_running(redis_client: redis.Redis, start: Callable[..., Running]) -> None:
    sim = start()
    assert redis_client.exists(keys.SIMULATOR_ALIVE)
    ttl: Any = redis_client.pttl(keys.SIMULATOR_ALIVE)
    assert 0 < ttl <= 3000
    sim.close()
    assert not redis_client.exists(keys.SIMULATOR_ALIVE)


def test_existing_rooms_are_read_from_the_end_unless_from_start(redis_client: redis.Redis, start: Callable[..., Running]) -> None:
    join(redis_client, "old")
    send(redis_client, "old", echo.text_echo(CONV, "before", "before", max_bytes=4096))
    sim = start()
    send(redis_client, "old", echo.text_echo(CONV, "after", "after", max_bytes=4096))
    wait_for(lambda: sim.utterance("old", "after"), "the new utterance")
    assert sim.utterance("old", "before") is None
    sim.close()

    again = start(from_start=True)
    wait_for(lambda: again.utterance("old", "before"), "the old utterance with from_start")


def test_only_named_rooms(redis_client: redis.Redis, start: Callable[..., Running]) -> None:
    sim = start(rooms=["mine"])
    join(redis_client, "other")
    send(redis_client, "other", echo.text_echo(CONV, "x", "x-other", max_bytes=4096))
    send(redis_client, "mine", echo.text_echo(CONV, "x", "x-mine", max_bytes=4096))
    wait_for(lambda: sim.utterance("mine", "x-mine"), "the named room's utterance")
    assert set(sim.sim.report()["rooms"]) == {"mine"}


def test_mic_frames_reassembled_with_pacing(redis_client: redis.Redis, start: Callable[..., Running], tmp_path: Path) -> None:
    sim = start()
    join(redis_client, "rm")
    frames = [pcm_bytes(640, seed=i) for i in range(5)]  # 20 ms each at 16 kHz
    times = [100.0, 100.0, 100.0, 100.06, 100.2]
    for pcm, t in zip(frames, times, strict=True):
        redis_client.xadd(keys.loopback_mic("rm"), {"pcm": pcm, "sample_rate": 16000, "t": f"{t:.6f}"})
    mic = wait_for(lambda: (m := sim.sim.report()["rooms"].get("rm", {}).get("mic")) and m["frames"] == 5 and m, "5 mic frames")
    assert mic["audio_seconds"] == pytest.approx(0.1)
    assert mic["wall_seconds"] == pytest.approx(0.22)
    assert mic["max_gap"] == pytest.approx(0.12)  # 100.06 -> 100.2 minus 20 ms
    assert mic["max_lead"] == pytest.approx(0.04)  # two frames written ahead at 100.0
    sim.close()
    with wave.open(str(tmp_path / "out" / "rm" / "mic.wav"), "rb") as wav:
        assert wav.getframerate() == 16000
        assert wav.readframes(wav.getnframes()) == b"".join(frames)


def test_report_json_written(redis_client: redis.Redis, start: Callable[..., Running], tmp_path: Path) -> None:
    sim = start()
    join(redis_client, "rr")
    send(redis_client, "rr", echo.text_echo(CONV, "hi", "inf-r", max_bytes=4096))
    path = tmp_path / "out" / "report.json"

    def written() -> dict[str, Any] | None:
        try:
            report: dict[str, Any] = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return report if report["rooms"].get("rr", {}).get("utterances") else None

    report = wait_for(written, "report.json with the utterance")
    assert report["messages"] == 1 and report["rooms"]["rr"]["utterances"][0]["inference_id"] == "inf-r"
    sim.close()
    assert json.loads(path.read_text()) == sim.sim.report()


def test_cli_unreachable_redis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--redis-url", "redis://127.0.0.1:1/0"])
    assert run_cli(args) != 0
    assert "cannot reach Redis" in capsys.readouterr().err


def test_cli_process_stops_cleanly_on_sigterm(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "cli-out"
    env = {**os.environ, "ECHOQ_REDIS_URL": redis_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.simulator", "--out", str(out), "--speed", "50"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: redis_client.exists(keys.SIMULATOR_ALIVE) or proc.poll() is not None, "the CLI to start")
        assert proc.poll() is None
        join(redis_client, "rcli")
        send(redis_client, "rcli", echo.text_echo(CONV, "from the cli", "inf-cli", max_bytes=4096))
        wait_for(lambda: stopped_event(redis_client, "rcli", "inf-cli"), "the CLI simulator to speak")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "inference_id=inf-cli" in stdout and "from the cli" not in stdout
    assert not redis_client.exists(keys.SIMULATOR_ALIVE)
    report = json.loads((out / "report.json").read_text())
    assert report["rooms"]["rcli"]["utterances"][0]["inference_id"] == "inf-cli"
