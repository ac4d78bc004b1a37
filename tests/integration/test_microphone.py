"""Microphone echo end to end on loopback rooms: real Redis, real worker processes, the simulator.

Frames land on ``echoq:loopback:<room>:mic`` with the time each was written; the simulator
reassembles them into ``mic.wav``. These tests assert completeness and order by samples; the
pacing figures (``max_gap``, ``max_lead``) depend on how busy the machine is and are measured by
``scripts/bench_microphone.py`` instead.
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.integration.conftest import Workers, wait_for, wire
from tests.integration.test_delivery import tone_wav
from worker import audio, chunks, keys
from worker.errors import InvalidInput
from worker.settings import get_settings
from worker.store import Store

pytestmark = pytest.mark.redis

RATE = 24000
FRAME_MS, LEAD_MS, GAP_MS = 20, 60, 200
MIC_ENV = {"ECHOQ_MIC_FRAME_MS": str(FRAME_MS), "ECHOQ_MIC_MAX_LEAD_MS": str(LEAD_MS), "ECHOQ_MIC_GAP_MS": str(GAP_MS)}
FRAME = chunks.chunk_bytes(RATE, FRAME_MS)
SILENCE = b"\0" * chunks.chunk_bytes(RATE, GAP_MS)


def converted(path: Path) -> bytes:
    s = get_settings()
    return audio.convert(path.read_bytes(), target_rate=RATE, max_bytes=s.max_audio_bytes,
                         max_seconds=s.max_audio_seconds)


def frames_of(pcm: bytes) -> list[bytes]:
    return list(chunks.rechunk([pcm], FRAME))


def mic_frames(client: redis.Redis, room: str) -> list[tuple[bytes, int, float]]:
    """Every frame written into a loopback room's microphone: (pcm, sample_rate, time written)."""
    entries: Any = client.xrange(keys.loopback_mic(room))
    return [(bytes(f[b"pcm"]), int(f[b"sample_rate"]), float(f[b"t"])) for _id, f in entries]


def mic_report(simulator: Any, room: str, size: int) -> dict[str, Any] | None:
    """The simulator's microphone figures for ``room`` once it holds ``size`` bytes of audio."""
    mic = (simulator.report()["rooms"].get(room) or {}).get("mic")
    return mic if mic and mic["bytes"] == size else None


def wav_pcm(path: str) -> bytes:
    with wave.open(path) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2)
        return w.readframes(w.getnframes())


def test_several_utterances_are_complete_and_in_order(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    workers.start(1, **MIC_ENV)
    client.open("mic-a", "loopback://mic-a", mode="microphone")
    clips = [tone_wav(tmp_path / "a.wav", 1.0, 500), tone_wav(tmp_path / "b.wav", 1.5, 700),
             tone_wav(tmp_path / "c.wav", 0.6, 900)]
    ids = [client.play("mic-a", clip) for clip in clips]
    for uid in ids:
        assert client.wait(uid, timeout=30)["state"] == "sent"

    pcms = [converted(clip) for clip in clips]
    want = SILENCE.join(pcms)
    got = mic_frames(redis_client, "mic-a")
    assert b"".join(pcm for pcm, _r, _t in got) == want
    assert [pcm for pcm, _r, _t in got] == frames_of(pcms[0]) + frames_of(SILENCE) + frames_of(pcms[1]) \
        + frames_of(SILENCE) + frames_of(pcms[2])
    assert {rate for _p, rate, _t in got} == {RATE}
    for uid, pcm in zip(ids, pcms, strict=True):
        assert client.status(uid)["chunks_sent"] == len(frames_of(pcm))
    assert wire(redis_client, "mic-a") == []  # no app messages in microphone mode

    # the simulator reassembled the track: every sample, in order
    mic = wait_for(lambda: mic_report(simulator, "mic-a", len(want)), 10, what="the simulator to take every frame")
    assert simulator.report()["rooms"]["mic-a"]["violations"] == []
    assert mic["audio_seconds"] == pytest.approx(len(want) / 2 / RATE, abs=1e-3)
    wait_for(lambda: Path(mic["wav"]).exists() and wav_pcm(mic["wav"]) == want, 10, what="mic.wav with every frame")


def test_interrupt_stops_the_frames_at_once_and_drops_the_queued(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    workers.start(1, **MIC_ENV)
    client.open("mic-i", "loopback://mic-i", mode="microphone")
    long_clip, short_clip = tone_wav(tmp_path / "long.wav", 2.0, 400), tone_wav(tmp_path / "short.wav", 0.5, 600)
    first = client.play("mic-i", long_clip)
    queued = [client.play("mic-i", short_clip) for _ in range(3)]
    wait_for(lambda: len(mic_frames(redis_client, "mic-i")) >= 15, 30, what="the first utterance to play")
    assert client.interrupt("mic-i") == 3
    assert client.wait(first, timeout=10)["state"] == "interrupted"
    assert {client.status(uid)["state"] for uid in queued} == {"cancelled"}

    asked = next(e["ts"] for _id, e in client.events("mic-i") if e["type"] == "interrupt.requested")
    cut = mic_frames(redis_client, "mic-i")
    assert sum(1 for _p, _r, t in cut if t > asked) <= 2  # the frame in flight, give or take a clock tick
    played = b"".join(pcm for pcm, _r, _t in cut)
    long_pcm = converted(long_clip)
    assert 0 < len(played) < len(long_pcm) and long_pcm.startswith(played)

    # the next utterance plays whole (after the gap of silence, if the cut was that recent)
    fresh = client.play("mic-i", short_clip)
    assert client.wait(fresh, timeout=20)["state"] == "sent"
    after = b"".join(pcm for pcm, _r, _t in mic_frames(redis_client, "mic-i")[len(cut):])
    assert after in (converted(short_clip), SILENCE + converted(short_clip))
    assert wire(redis_client, "mic-i") == []  # the stream is the interrupt: no app message


def test_kill_9_of_the_owner_mid_utterance_another_worker_resumes_the_stream(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    workers.start(2, **MIC_ENV)
    client.open("mic-k", "loopback://mic-k", mode="microphone")
    long_clip, short_clip = tone_wav(tmp_path / "long.wav", 3.0, 300), tone_wav(tmp_path / "short.wav", 0.5, 800)
    first, second = client.play("mic-k", long_clip), client.play("mic-k", short_clip)
    wait_for(lambda: len(mic_frames(redis_client, "mic-k")) >= 40, 30, what="0.8 s of the first utterance")
    victim = workers.owner("mic-k")
    assert victim is not None
    victim.proc.kill()  # SIGKILL: no shutdown code runs
    victim.proc.wait(10)

    assert client.wait(first, timeout=60)["state"] == "sent"
    assert client.wait(second, timeout=30)["state"] == "sent"
    assert workers.owner("mic-k") is not victim

    got = [pcm for pcm, _r, _t in mic_frames(redis_client, "mic-k")]
    want = frames_of(converted(long_clip)) + frames_of(SILENCE) + frames_of(converted(short_clip))
    # nothing lost, at most the frame in flight when the owner died written twice
    assert len(got) - len(want) in (0, 1)
    if len(got) == len(want) + 1:
        dup = next(i for i in range(len(want)) if got[i] != want[i])
        assert got[dup] == got[dup - 1]
        got = got[:dup] + got[dup + 1:]
    assert got == want


def test_text_is_refused_by_the_client_and_failed_by_the_worker(
    workers: Workers, simulator: Any, client: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    workers.start(1, **MIC_ENV)
    client.open("mic-t", "loopback://mic-t", mode="microphone")
    with pytest.raises(InvalidInput, match="microphone mode"):
        client.say("mic-t", "Hello there!")

    # a text entry written to the log another way fails its utterance; the conversation goes on
    Store(redis_client).enqueue(
        "mic-t", {"utterance_id": "typed", "kind": "text", "text": "Hello", "inference_id": "typed"},
        {"id": "typed", "conversation_id": "mic-t", "inference_id": "typed", "kind": "text"})
    clip = tone_wav(tmp_path / "t.wav", 0.5, 650)
    good = client.play("mic-t", clip)
    rec = client.wait("typed", timeout=20)
    assert rec["state"] == "failed" and "no text-to-speech" in rec["error"]
    assert client.wait(good, timeout=20)["state"] == "sent"
    assert b"".join(pcm for pcm, _r, _t in mic_frames(redis_client, "mic-t")) == converted(clip)
    assert wire(redis_client, "mic-t") == []
