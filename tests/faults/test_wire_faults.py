"""Faults in the room and in the audio: failed sends, dropped connections, lying and broken files."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import Rig, loop_paced, wait_for
from tests.faults.judge import Verdict, expected_chunks, ffmpeg_file, judge, noise_wav, sent

pytestmark = [pytest.mark.redis, pytest.mark.faults]

DELIVERED = ("sent", "spoken")


@pytest.mark.parametrize("pacing", ["burst", "loop"])
def test_half_of_all_sends_failing_and_dropped_connections_lose_and_repeat_nothing(rig: Rig, figures: dict[str, Any],
                                                                                   pacing: str) -> None:
    rig.start_workers(1, **({"ECHOQ_PACING": "realtime"} if pacing == "loop" else {}))
    rooms = {"rf": "loopback://rf?fail_rate=0.5&seed=3", "rd": "loopback://rd?fail_rate=0.5&disconnect_after=3&seed=4"}
    expected: dict[str, list[tuple[str, Any]]] = {}
    for room, url in rooms.items():
        rig.client.open(f"conv-{room}", url)
        items: list[tuple[str, Any]] = []
        for i in range(4):
            clip = noise_wav(rig.tmp / f"{room}{i}.wav", 0.8, seed=i)
            items.append((rig.client.play(f"conv-{room}", clip, utterance_id=f"{room}-a{i}"), expected_chunks(clip)))
            items.append((rig.client.say(f"conv-{room}", f"{room} {i}", utterance_id=f"{room}-t{i}"), f"{room} {i}"))
        expected[room] = items
    for items in expected.values():
        for uid, _ in items:
            assert rig.client.wait(uid, timeout=90)["state"] in DELIVERED
    log = rig.workers.started[0].log()
    assert "SendFailed" in log and "RoomDisconnected" in log and "rejoined" in log  # the faults did happen
    verdict = Verdict()
    for room, items in expected.items():
        verdict.add(judge(sent(rig.client_redis, room), items))
    assert pacing != "loop" or loop_paced(rig.workers) > 0, "the pacing loop sent none of it"
    figures.update(fault=f"50% of sends fail (2 rooms; one also drops its connection every 3 messages){' (real-time pacing loop)' if pacing == 'loop' else ''}",
                   workers=1,
                   note=f"{log.count('send.retry')} send retries, {log.count('rejoined')} rejoins", **verdict.figures())
    assert (verdict.lost, verdict.repeated, verdict.reordered, verdict.interleaved, verdict.reused,
            verdict.bad_ends) == (0, 0, 0, 0, 0, 0), verdict.problems


def _heard(rig: Rig, room: str, messages: int) -> dict[str, Any]:
    """The replica's report on ``room`` once it has read all ``messages`` on the wire: it finds
    new rooms every 0.2 s, and a fast worker can be done before it has looked."""
    def report() -> dict[str, Any] | None:
        heard: dict[str, Any] | None = rig.simulator.report()["rooms"].get(room)
        return heard if heard is not None and heard["messages"] >= messages else None

    out: dict[str, Any] = wait_for(report, 30, what=f"the replica to read the {messages} messages in {room}")
    return out


def _overlong_mp3(tmp: Path) -> Path:
    """An MP3 whose size-based duration estimate (no Xing header) says about 2.2 s: a loud 160 kb/s
    head, then 4 s at 8 kb/s. It holds 4.5 s."""
    head = ffmpeg_file(tmp / "head.mp3", "-f", "lavfi", "-i", "sine=frequency=500:duration=0.5", "-ar", "24000",
                       "-ac", "1", "-b:a", "160k", "-write_xing", "0", "-id3v2_version", "0")
    tail = ffmpeg_file(tmp / "tail.mp3", "-f", "lavfi", "-i", "sine=frequency=700:duration=4", "-ar", "24000",
                       "-ac", "1", "-b:a", "8k", "-write_xing", "0", "-id3v2_version", "0")
    out = tmp / "overlong.mp3"
    out.write_bytes(head.read_bytes() + tail.read_bytes())
    return out


def _broken_m4a(tmp: Path) -> Path:
    """An AAC file whose header is sound and whose frames after the first third are noise: it
    decodes for a while, then the decoder gives up (ffmpeg exits with an error)."""
    good = ffmpeg_file(tmp / "good.m4a", "-f", "lavfi", "-i", "sine=frequency=500:duration=3", "-ar", "24000",
                       "-ac", "1", "-c:a", "aac", "-movflags", "+faststart")
    data = bytearray(good.read_bytes())
    dice = random.Random(2)
    for i in range(len(data) * 3 // 10, len(data)):
        data[i] = dice.randrange(256)
    out = tmp / "broken.m4a"
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize(("case", "pacing"), [("longer-than-its-header", "burst"), ("longer-than-its-header", "loop")])
def test_an_utterance_failing_mid_stream_is_cut_with_an_interrupt_and_the_next_one_plays(
        rig: Rig, figures: dict[str, Any], case: str, pacing: str) -> None:
    rig.start_workers(1, ECHOQ_MAX_AUDIO_SECONDS="3", **({"ECHOQ_PACING": "realtime"} if pacing == "loop" else {}))
    rig.client.open("conv", "loopback://room")
    bad = _overlong_mp3(rig.tmp)
    after = noise_wav(rig.tmp / "after.wav", 0.6, seed=9)
    expected: list[tuple[str, Any]] = [
        (rig.client.play("conv", bad, utterance_id="bad"), []),
        (rig.client.say("conv", "next line", utterance_id="next"), "next line"),
        (rig.client.play("conv", after, utterance_id="after"), expected_chunks(after)),
    ]
    rec = rig.client.wait("bad", timeout=60)
    assert rec["state"] == "failed"
    assert "conversation.interrupt sent" in rec["error"]
    assert "longer than the limit" in rec["error"]
    for uid, _ in expected[1:]:
        assert rig.client.wait(uid, timeout=60)["state"] in DELIVERED

    stream = sent(rig.client_redis, "room")
    kinds = [("bad" if s.message.get("properties", {}).get("inference_id") == "bad" else s.message["event_type"])
             for s in stream]
    cut_at = kinds.index("conversation.interrupt")
    assert cut_at > 0 and set(kinds[:cut_at]) == {"bad"}, "part of the bad utterance went out, then the interrupt"
    assert "bad" not in kinds[cut_at:]
    assert not any(s.message["properties"].get("done") for s in stream[:cut_at])
    verdict = judge(stream, expected, may_cut=frozenset({"bad"}))
    assert pacing != "loop" or loop_paced(rig.workers) > 0, "the pacing loop sent none of it"
    figures.update(fault=f"audio {case.replace('-', ' ')}{' (real-time pacing loop)' if pacing == 'loop' else ''}", workers=1, **verdict.figures(),
                   note=f"{cut_at} chunks, then conversation.interrupt; the next 2 utterances played")
    assert (verdict.lost, verdict.repeated, verdict.reordered, verdict.interleaved, verdict.reused) == (0, 0, 0, 0, 0), \
        verdict.problems
    assert _heard(rig, "room", len(stream))["violations"] == []


def test_a_decoder_giving_up_part_way_ends_the_utterance_cleanly_with_a_note_and_the_next_one_plays(
        rig: Rig, figures: dict[str, Any]) -> None:
    """Audio whose frames turn to noise part-way: what decodes is spoken and closed with ``done``
    (never a half-sent utterance), the record says where and why the decoder stopped, and what was
    queued after it plays in order."""
    rig.start_workers(1)
    rig.client.open("conv", "loopback://room")
    bad = _broken_m4a(rig.tmp)
    after = noise_wav(rig.tmp / "after.wav", 0.6, seed=9)
    expected: list[tuple[str, Any]] = [
        (rig.client.play("conv", bad, utterance_id="bad"), expected_chunks(bad)),  # as far as it decodes
        (rig.client.say("conv", "next line", utterance_id="next"), "next line"),
        (rig.client.play("conv", after, utterance_id="after"), expected_chunks(after)),
    ]
    rec = rig.client.wait("bad", timeout=60)
    assert rec["state"] in DELIVERED and rec["state"] != "failed"
    assert "decoder stopped early" in rec["decode_note"]
    for uid, _ in expected[1:]:
        assert rig.client.wait(uid, timeout=60)["state"] in DELIVERED

    stream = sent(rig.client_redis, "room")
    assert [s.message["event_type"] for s in stream].count("conversation.interrupt") == 0
    bad_msgs = [s.message for s in stream if s.message.get("properties", {}).get("inference_id") == "bad"]
    assert bad_msgs and [m["properties"]["done"] for m in bad_msgs] == [False] * (len(bad_msgs) - 1) + [True]
    verdict = judge(stream, expected)
    figures.update(fault="audio whose decoder gives up part-way", workers=1, **verdict.figures(),
                   note=f"{len(bad_msgs)} chunks decoded and spoken, closed with done; the next 2 utterances played")
    assert (verdict.lost, verdict.repeated, verdict.reordered, verdict.interleaved, verdict.reused,
            verdict.bad_ends) == (0, 0, 0, 0, 0, 0), verdict.problems
    assert _heard(rig, "room", len(stream))["violations"] == []


def test_the_rate_cap_holds_for_text_and_interrupts(rig: Rig, figures: dict[str, Any]) -> None:
    # the room refuses more than 10 messages in a second; the worker is capped at 8 for every kind
    rig.start_workers(1, ECHOQ_MAX_MESSAGES_PER_SECOND="8")
    rig.client.open("conv", "loopback://room?max_rate=10")
    ids = [rig.client.say("conv", f"line {i}", utterance_id=f"t{i}") for i in range(20)]
    for uid in ids:
        assert rig.client.wait(uid, timeout=60)["state"] in DELIVERED
    rig.client.interrupt("conv")
    fresh = [rig.client.say("conv", f"fresh {i}", utterance_id=f"f{i}") for i in range(4)]
    for uid in fresh:
        assert rig.client.wait(uid, timeout=60)["state"] in DELIVERED
    stream = sent(rig.client_redis, "room")
    assert [s.message["event_type"] for s in stream].count("conversation.interrupt") == 1
    log = rig.workers.started[0].log()
    figures.update(fault="room allows 10 messages/s, worker capped at 8 (text and interrupt)", workers=1,
                   utterances=len(ids) + len(fresh), messages=len(stream),
                   note=f"{log.count('RateLimited')} messages refused by the room for rate")
    assert "RateLimited" not in log
