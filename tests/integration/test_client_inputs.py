"""Audio from a path, bytes, raw PCM and an http(s) URL; limits refused before enqueue."""

from __future__ import annotations

import base64
import http.server
import threading
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from tests.integration.conftest import Workers, wire
from worker import keys
from worker.errors import AudioError, InvalidInput
from worker.settings import Settings

pytestmark = pytest.mark.redis


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server over a temporary folder."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


def pcm_24k(seconds: float) -> bytes:
    t = np.arange(int(seconds * 24000)) / 24000
    return (0.3 * 32767 * np.sin(2 * np.pi * 330 * t)).astype("<i2").tobytes()


def write_wav(path: Path, pcm: bytes, rate: int = 24000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return path


def audio_of(redis_client: redis.Redis, room: str, inference_id: str) -> bytes:
    return b"".join(base64.b64decode(m["properties"]["audio"]) for m in wire(redis_client, room)
                    if m["properties"].get("inference_id") == inference_id)


def trusting(redis_client: redis.Redis, **settings: Any) -> Any:
    """A client allowed to fetch from this machine, where the tests' HTTP servers run."""
    from producer.client import EchoqClient

    return EchoqClient(settings=Settings(fetch_allow_hosts="127.0.0.1", **settings), redis_client=redis_client)


def test_audio_from_a_url_bytes_and_raw_pcm_arrives_unchanged(
    workers: Workers, simulator: Any, redis_client: redis.Redis, http_dir: tuple[str, Path]
) -> None:
    base, root = http_dir
    client = trusting(redis_client)
    pcm = pcm_24k(0.5)  # already 24 kHz mono: passes through sample for sample
    write_wav(root / "clip.wav", pcm)
    workers.start(1)
    client.open("conv-in", "loopback://room-in")
    from_url = client.play("conv-in", f"{base}/clip.wav")
    from_bytes = client.play("conv-in", (root / "clip.wav").read_bytes())
    from_raw = client.play("conv-in", pcm, format="raw", source_rate=24000)
    for uid in (from_url, from_bytes, from_raw):
        assert client.wait(uid, timeout=30)["state"] in ("sent", "spoken")
        assert audio_of(redis_client, "room-in", uid) == pcm


def test_bad_audio_sources_are_refused_before_anything_is_enqueued(
    redis_client: redis.Redis, http_dir: tuple[str, Path], tmp_path: Path
) -> None:
    base, root = http_dir
    client = trusting(redis_client)
    client.open("conv-x", "loopback://room-x")
    with pytest.raises(AudioError, match="HTTP 404"):
        client.play("conv-x", f"{base}/missing.wav")
    with pytest.raises(AudioError, match="could not fetch"):
        client.play("conv-x", "http://127.0.0.1:1/clip.wav")
    with pytest.raises(AudioError, match="empty"):
        client.play("conv-x", b"")
    with pytest.raises(InvalidInput, match="source_rate"):
        client.play("conv-x", pcm_24k(0.1), format="raw")

    from producer.client import EchoqClient

    small = trusting(redis_client, max_audio_bytes=2048, max_audio_seconds=0.2)
    write_wav(root / "big.wav", pcm_24k(0.5))
    with pytest.raises(AudioError, match="over the limit of 2048"):
        small.play("conv-x", root / "big.wav")
    with pytest.raises(AudioError, match="over the limit of 2048"):
        small.play("conv-x", f"{base}/big.wav")
    long_small = EchoqClient(settings=Settings(max_audio_seconds=0.2), redis_client=redis_client)
    with pytest.raises(AudioError):
        long_small.play("conv-x", root / "big.wav")
    assert redis_client.llen(keys.conv_log("conv-x")) == 0
    assert not redis_client.keys("echoq:blob:*")


def test_play_reads_only_the_header_and_the_worker_records_what_decodes(
    workers: Workers, simulator: Any, redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """play() starts no process (no ffprobe, no decode): the record's duration is the header's
    until the worker has decoded the audio, then the decoded one. A file whose header is sound
    and whose frames are not fails in the worker, saying why, and the next utterance plays."""
    import subprocess

    from tests.badinput import encode

    client = trusting(redis_client)
    workers.start(1)
    client.open("conv-h", "loopback://room-h")
    mp3 = encode(tmp_path, "mp3", 1.0, 44100)
    good = tmp_path / "ok.mp3"
    good.write_bytes(mp3)
    # a sound FLAC header (its STREAMINFO says 1 s) whose frames are noise: only decoding tells
    flac = encode(tmp_path, "flac", 1.0, 44100)
    first_frame = flac.find(b"\xff\xf8", 42)
    noise = np.random.default_rng(4).integers(0, 256, len(flac) - first_frame - 2, dtype=np.uint8).tobytes()
    broken = flac[:first_frame + 2] + noise

    def no_process(*args: object, **kw: object) -> None:
        raise AssertionError("play() started a process")

    with monkeypatch.context() as m:
        m.setattr(subprocess, "Popen", no_process)
        played = client.play("conv-h", good, utterance_id="good")
        failing = client.play("conv-h", broken, utterance_id="broken")
        after = client.play("conv-h", pcm_24k(0.3), format="raw", source_rate=24000, utterance_id="after")
    queued = client.status(played)
    assert queued["duration_in"] == 1.0 and queued["duration_estimated"] is False  # the Xing header's count
    rec = client.wait(played, timeout=30)
    assert rec["state"] in ("sent", "spoken") and rec["duration_in"] == 1.0 and "decode_note" not in rec
    bad = client.wait(failing, timeout=30)
    assert bad["state"] == "failed" and "audio is unreadable" in bad["error"], bad
    assert client.wait(after, timeout=30)["state"] in ("sent", "spoken")
    inference_ids = [m.get("properties", {}).get("inference_id", m["event_type"]) for m in wire(redis_client, "room-h")]
    assert "broken" not in inference_ids  # nothing of it was sent: not a sample decoded
    assert inference_ids.index("after") > inference_ids.index("good")
