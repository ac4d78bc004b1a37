"""The simulator's pure parts: room rules and player with explicit times, mic pacing, file names."""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import pytest

from worker import echo
from worker.simulator.files import safe_name, write_wav
from worker.simulator.mic import MicTrack
from worker.simulator.room import Room, text_seconds

CONV = "c1"


def chunk(iid: str, ms: int, done: bool, rate: int = 16000) -> dict[str, Any]:
    return echo.audio_echo(CONV, b"\x01\x00" * (rate * ms // 1000), rate, iid, done, max_bytes=1 << 20)


def kinds(room: Room) -> list[str]:
    return [v.kind for v in room.violations]


def types(room: Room) -> list[tuple[str, str]]:
    return [(e["event_type"].rsplit(".", 1)[-1], e["inference_id"]) for e in room.events]


def test_player_waits_when_the_buffer_runs_dry() -> None:
    room = Room("r", speed=1.0, max_message_bytes=1 << 20)
    room.handle(chunk("a", 100, False), now=10.0)
    assert types(room) == [("started_speaking", "a")]
    assert room.next_deadline() is None  # not done: no end known yet
    room.advance(11.0)  # the 100 ms ran out long ago: the player waits
    room.handle(chunk("a", 100, True), now=11.0)
    assert room.next_deadline() == pytest.approx(11.1)
    room.advance(11.1)
    stopped = room.events[-1]
    assert stopped["properties"] == {"duration": pytest.approx(0.2), "interrupted": False}
    assert [e["seq"] for e in room.events] == [1, 2]


def test_queued_utterance_starts_when_the_previous_ends_and_speed_divides_time() -> None:
    room = Room("r", speed=4.0, max_message_bytes=1 << 20)
    room.handle(chunk("a", 400, True), now=0.0)
    room.handle(chunk("b", 400, True), now=0.01)
    room.advance(0.15)  # a ended at 0.1 (400 ms / 4); b started then and ends at 0.2
    assert types(room) == [("started_speaking", "a"), ("stopped_speaking", "a"), ("started_speaking", "b")]
    assert room.next_deadline() == pytest.approx(0.2)
    assert [e["turn_idx"] for e in room.events] == [0, 0, 1]


def test_interleaving_is_reported_once_per_switch() -> None:
    room = Room("r", max_message_bytes=1 << 20)
    room.handle(chunk("a", 20, False), now=0)
    for i in range(3):
        room.handle(chunk("b", 20, i == 2), now=0)
    assert kinds(room) == ["interleaved"]
    room.handle(chunk("a", 20, True), now=0)  # resuming a after b
    assert kinds(room) == ["interleaved", "interleaved"]


def test_after_done_reused_and_after_interrupt() -> None:
    room = Room("r", max_message_bytes=1 << 20)
    room.handle(chunk("a", 20, True), now=0)
    room.handle(chunk("a", 20, True), now=0)
    room.handle(chunk("b", 20, False), now=0)
    room.handle(echo.interrupt(CONV), now=0)
    room.handle(chunk("b", 20, True), now=0)
    room.handle(chunk("a", 20, True), now=0)
    assert kinds(room) == ["after done", "after interrupt", "reused inference_id"]
    assert room.utterances["b"].cut and not room.utterances["b"].done
    assert len(room.utterances["b"].pcm) == 640


def test_interrupt_drops_queued_without_events() -> None:
    room = Room("r", speed=1.0, max_message_bytes=1 << 20)
    room.handle(chunk("a", 1000, True), now=0)
    room.handle(chunk("b", 1000, True), now=0)
    room.handle(echo.interrupt(CONV), now=0.25)
    assert types(room) == [("started_speaking", "a"), ("stopped_speaking", "a")]
    assert room.events[-1]["properties"] == {"duration": pytest.approx(0.25), "interrupted": True}
    assert room.utterances["b"].interrupted and room.utterances["b"].played == 0
    assert not room.busy


def test_invalid_messages_are_violations_and_ignored() -> None:
    room = Room("r", max_message_bytes=4096)
    bad = chunk("a", 20, True)
    bad["properties"]["done"] = "true"
    room.handle(bad, now=0)
    room.handle("not an object", now=0)
    assert kinds(room) == ["invalid", "invalid"]
    assert room.utterances == {} and room.events == []


def test_text_duration_rule() -> None:
    assert text_seconds("hi") == 0.5
    assert text_seconds("one two three four five") == pytest.approx(2.0)


def test_mic_pacing_for_a_real_time_sender() -> None:
    track = MicTrack()
    for i in range(10):
        assert track.add(b"\0\0" * 320, 16000, 50.0 + i * 0.02) is None
    assert track.audio_seconds == pytest.approx(0.2)
    assert track.wall_seconds == pytest.approx(0.2)
    assert track.max_gap == pytest.approx(0.0, abs=1e-9)
    assert track.max_lead == pytest.approx(0.0, abs=1e-9)
    assert track.add(b"\0\0", 24000, 51.0) is not None  # rate change refused
    assert track.frames == 10


def test_safe_name_and_wav(tmp_path: Path) -> None:
    assert safe_name("../a b/c") == "_a_b_c"
    path = tmp_path / "x" / "a.wav"
    write_wav(path, b"\x01\x02" * 5, 24000)
    with wave.open(str(path), "rb") as wav:
        assert (wav.getframerate(), wav.readframes(10)) == (24000, b"\x01\x02" * 5)
    assert [p.name for p in path.parent.iterdir()] == ["a.wav"]
