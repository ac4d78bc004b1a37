"""worker.microphone without services: the frame clock, the reader, and the sender end to end.

The sender runs against an in-memory stand-in for :class:`worker.store.Store` (the methods the
sender uses, with the same semantics as the Lua scripts) and either a recording transport or
the Daily transport over the ``daily`` double (tests/doubles/fake_daily.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from tests.doubles.fake_daily import FakeDaily
from worker import chunks
from worker.errors import AudioError, SendFailed
from worker.microphone import FrameClock, FrameReader, MicrophoneSender
from worker.settings import Settings
from worker.store import Cursor, Moved
from worker.transports import Transport
from worker.transports.daily import DailyTransport, shutdown_all, wait_for_cleanup

CID = "c1"
TOKEN = "worker-a:1"
RATE = 24000
FRAME_MS = 20
FRAME = chunks.chunk_bytes(RATE, FRAME_MS)


class MemoryStore:
    """The part of :class:`worker.store.Store` a sender uses, for one conversation, in memory."""

    def __init__(self) -> None:
        self.log: list[dict[str, Any]] = []
        self.records: dict[str, dict[str, Any]] = {}
        self.blobs: dict[str, bytes] = {}
        self.events: list[dict[str, Any]] = []
        self.lease = TOKEN
        self.seq = self.chunk = self.gen = 0
        self.interrupt_gen = self.interrupt_upto = 0
        self.lock = threading.Lock()

    # test helpers
    def add_audio(self, uid: str, pcm: bytes) -> None:
        self.blobs[uid] = pcm
        self._append({"utterance_id": uid, "kind": "audio", "inference_id": uid, "sample_rate": RATE,
                      "format": "s16le", "source_rate": RATE, "channels": 1})

    def add_text(self, uid: str, text: str) -> None:
        self._append({"utterance_id": uid, "kind": "text", "text": text, "inference_id": uid})

    def _append(self, entry: dict[str, Any]) -> None:
        with self.lock:
            entry["seq"] = len(self.log) + 1
            self.log.append(entry)
            self.records[entry["utterance_id"]] = {"state": "queued", "seq": entry["seq"]}

    def interrupt(self, conversation_id: str = CID) -> tuple[int, int]:
        with self.lock:
            cancelled = 0
            for entry in self.log[self.seq:]:
                rec = self.records[entry["utterance_id"]]
                if rec["state"] == "queued":
                    rec.update(state="cancelled", error="cancelled by interrupt")
                    cancelled += 1
            self.interrupt_upto = len(self.log)
            self.interrupt_gen += 1
            return self.interrupt_gen, cancelled

    def state(self, uid: str) -> str:
        return str(self.records[uid]["state"])

    # what the sender calls
    def cursor(self, conversation_id: str) -> Cursor:
        return Cursor(self.seq, self.chunk, self.gen)

    def interrupt_state(self, conversation_id: str) -> tuple[int, int]:
        return self.interrupt_gen, self.interrupt_upto

    def entries_after(self, conversation_id: str, seq: int, count: int = 64) -> list[dict[str, Any]]:
        return [dict(e) for e in self.log[seq: seq + count]]

    def utterance(self, utterance_id: str) -> dict[str, Any] | None:
        rec = self.records.get(utterance_id)
        return dict(rec) if rec is not None else None

    def start_utterance(self, utterance_id: str) -> int:
        rec = self.records[utterance_id]
        if rec["state"] == "queued":
            rec["state"] = "sending"
            return 1
        return 2 if rec["state"] == "sending" else 0

    def update_utterance(self, utterance_id: str, **fields: Any) -> None:
        self.records[utterance_id].update({k: v for k, v in fields.items() if v is not None})

    def mark_sent(self, utterance_id: str, messages: int) -> str:
        rec = self.records[utterance_id]
        rec.update(state=rec.get("replica_outcome", "sent"), chunks_sent=messages, chunks_total=messages)
        return str(rec["state"])

    def advance(self, conversation_id: str, token: str, seq: int, chunk: int, gen: int | None = None, *,
                epoch: int | None = None, ttl_s: float | None = None) -> int | None:
        if token != self.lease:
            return None
        self.seq, self.chunk = seq, chunk
        if gen is not None:
            self.gen = gen
        return self.interrupt_gen

    def move(self, conversation_id: str, token: str, seq: int, chunk: int, gen: int | None = None, *,
             epoch: int | None = None, ttl_s: float | None = None, utterance_id: str | None = None,
             chunks_sent: int | None = None, append: Any = None, refuse_above: int | None = None) -> Moved:
        assert append is None, "a microphone writes its frames itself"
        current = self.advance(conversation_id, token, seq, chunk, gen, epoch=epoch, ttl_s=ttl_s)
        if current is not None and utterance_id and chunks_sent is not None:
            self.records[utterance_id]["chunks_sent"] = chunks_sent
        return Moved(current is not None, current or 0, current is not None)

    def renew_lease(self, conversation_id: str, token: str, ttl_s: float, epoch: int | None = None) -> bool:
        return token == self.lease

    def blob(self, utterance_id: str) -> bytes | None:
        return self.blobs.get(utterance_id)

    def blob_start(self, utterance_id: str, length: int) -> tuple[int | None, bytes]:
        data = self.blobs.get(utterance_id)
        return (len(data) or None, data[:length]) if data is not None else (None, b"")

    def blob_range(self, utterance_id: str, start: int, end: int) -> bytes:
        return self.blobs.get(utterance_id, b"")[start:end]

    def drop_blob(self, utterance_id: str) -> None:
        self.blobs.pop(utterance_id, None)

    def add_event(self, conversation_id: str, event: dict[str, Any]) -> None:
        self.events.append(event)


class RecordingTransport(Transport):
    """A room that keeps every frame with the monotonic time it was written."""

    def __init__(self, *, fail_writes: int = 0, on_frame: Callable[[int], object] | None = None) -> None:
        super().__init__("memory://room")
        self.frames: list[tuple[bytes, int, float]] = []
        self.sent: list[dict[str, Any]] = []
        self.fail_writes = fail_writes
        self.on_frame = on_frame

    @property
    def connected(self) -> bool:
        return True

    def join(self, timeout: float) -> None: ...
    def wait_for_replica(self, timeout: float) -> None: ...
    def leave(self) -> None: ...

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def write_frames(self, pcm: bytes, sample_rate: int) -> None:
        if self.fail_writes:
            self.fail_writes -= 1
            raise SendFailed("injected")
        self.frames.append((pcm, sample_rate, time.monotonic()))
        if self.on_frame is not None:
            self.on_frame(len(self.frames))


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"mic_frame_ms": FRAME_MS, "mic_max_lead_ms": 40, "mic_gap_ms": 100,
                              "retry_base_delay_s": 0.001, "retry_max_delay_s": 0.002,
                              "join_timeout_s": 5.0, "send_timeout_s": 5.0}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def sender(store: MemoryStore, transport: Transport, wake: threading.Event | None = None,
           **overrides: Any) -> MicrophoneSender:
    return MicrophoneSender(CID, store=store, transport=transport, settings=settings(**overrides),  # type: ignore[arg-type]
                            token=TOKEN, wake=wake or threading.Event(), stopping=lambda: False)


def tone(seconds: float, freq: float) -> bytes:
    """s16le mono PCM at RATE: passes through the conversion unchanged."""
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def frames_of(pcm: bytes) -> list[bytes]:
    return list(chunks.rechunk([pcm], FRAME))


def silence(ms: int) -> list[bytes]:
    return frames_of(b"\0" * chunks.chunk_bytes(RATE, ms))


# -- FrameClock --------------------------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_clock_lets_frames_run_at_most_the_lead_ahead() -> None:
    now = FakeTime()
    clock = FrameClock(max_lead_s=0.06, slack_s=0.02, now=now)
    assert clock.since_end() == float("inf")
    assert clock.due() == pytest.approx(100.0 - 0.06)  # the first frame goes at once
    for _ in range(3):
        clock.wrote(0.02)
    assert clock.due() == pytest.approx(100.0)  # 60 ms written: the next one waits for real time
    clock.wrote(0.02)
    assert clock.due() == pytest.approx(100.02)
    assert clock.since_end() == pytest.approx(-0.08)


def test_clock_catches_up_a_small_delay_but_re_anchors_after_a_stall() -> None:
    now = FakeTime()
    clock = FrameClock(max_lead_s=0.0, slack_s=0.02, now=now)
    clock.due()
    clock.wrote(0.02)
    now.now += 0.03  # 10 ms late: within the slack, keep the schedule (no drift)
    assert clock.due() == pytest.approx(100.02)
    clock.wrote(0.02)
    now.now += 0.5  # a stall: the audio ran out long ago; start again rather than burst
    assert clock.due() == pytest.approx(now.now)
    assert clock.since_end() == pytest.approx(0.0)


# -- FrameReader -------------------------------------------------------------------------------


def test_reader_yields_the_frames_in_order_and_raises_what_the_conversion_raised() -> None:
    reader = FrameReader("u1", lambda: iter([b"a", b"b", b"c"]), ahead=1)
    assert list(reader.frames()) == [b"a", b"b", b"c"]
    reader.close()

    def broken() -> Iterator[bytes]:
        yield b"a"
        raise AudioError("cannot decode")

    reader = FrameReader("u2", broken, ahead=4)
    got = reader.frames()
    assert next(got) == b"a"
    with pytest.raises(AudioError, match="cannot decode"):
        next(got)
    reader.close()


def test_closing_a_reader_stops_its_thread_and_closes_the_conversion() -> None:
    closed = threading.Event()

    def endless() -> Iterator[bytes]:
        try:
            while True:
                yield b"\0\0"
        finally:
            closed.set()

    reader = FrameReader("u1", endless, ahead=2)
    assert next(reader.frames()) == b"\0\0"
    reader.close()
    assert closed.is_set()


# -- the sender --------------------------------------------------------------------------------


def test_utterances_are_written_in_order_in_frames_with_silence_between_and_paced() -> None:
    store, room = MemoryStore(), RecordingTransport()
    clips = {"u1": tone(0.3, 440), "u2": tone(0.22, 660), "u3": tone(0.1, 880)}
    for uid, pcm in clips.items():
        store.add_audio(uid, pcm)
    assert sender(store, room).drain() == 3

    want = frames_of(clips["u1"]) + silence(100) + frames_of(clips["u2"]) + silence(100) + frames_of(clips["u3"])
    assert [f for f, _r, _t in room.frames] == want
    assert {r for _f, r, _t in room.frames} == {RATE}
    assert all(len(f) == FRAME for f, _r, _t in room.frames)  # every clip here is whole frames
    for uid, pcm in clips.items():
        assert store.state(uid) == "sent"
        assert store.records[uid]["chunks_sent"] == len(frames_of(pcm))  # frames, not silence
    assert (store.seq, store.chunk) == (3, 0)
    assert room.sent == []  # no app messages in microphone mode


def test_a_text_entry_fails_with_a_clear_error_and_the_next_audio_still_plays() -> None:
    store, room = MemoryStore(), RecordingTransport()
    store.add_text("t1", "Hello")
    store.add_audio("u1", tone(0.1, 500))
    sender(store, room).drain()
    assert store.state("t1") == "failed"
    assert "microphone mode" in store.records["t1"]["error"]
    assert "text-to-speech" in store.records["t1"]["error"]
    assert store.state("u1") == "sent"
    assert [f for f, _r, _t in room.frames] == frames_of(tone(0.1, 500))


def test_interrupt_stops_the_frames_at_once_cancels_the_queued_and_sends_no_message() -> None:
    store = MemoryStore()
    room = RecordingTransport(on_frame=lambda n: store.interrupt() if n == 5 else None)
    store.add_audio("u1", tone(0.4, 440))
    store.add_audio("u2", tone(0.2, 550))
    store.add_audio("u3", tone(0.2, 660))
    sender(store, room).drain()

    assert [f for f, _r, _t in room.frames] == frames_of(tone(0.4, 440))[:5]  # nothing after
    assert store.state("u1") == "interrupted"
    assert store.state("u2") == store.state("u3") == "cancelled"
    assert room.sent == []
    assert (store.seq, store.gen) == (3, 1)
    assert any(e["type"] == "interrupt.sent" for e in store.events)


def test_an_interrupt_during_a_pacing_wait_is_seen_without_writing_another_frame() -> None:
    store, wake = MemoryStore(), threading.Event()
    room = RecordingTransport()
    store.add_audio("u1", tone(1.0, 440))
    s = sender(store, room, wake, mic_max_lead_ms=0)

    def interrupt_soon() -> None:
        while len(room.frames) < 3:
            time.sleep(0.001)
        store.interrupt()
        wake.set()

    t = threading.Thread(target=interrupt_soon)
    t.start()
    s.drain()
    t.join()
    assert 3 <= len(room.frames) <= 4  # the frame in flight at most
    assert store.state("u1") == "interrupted"


def test_a_resumed_utterance_starts_at_the_cursor_frame_without_silence() -> None:
    store, room = MemoryStore(), RecordingTransport()
    pcm = tone(0.3, 440)
    store.add_audio("u1", pcm)
    store.records["u1"]["state"] = "sending"  # a worker died mid-way
    store.chunk = 6
    sender(store, room).drain()
    assert [f for f, _r, _t in room.frames] == frames_of(pcm)[6:]
    assert store.state("u1") == "sent"


def test_failed_writes_are_retried_and_no_frame_is_lost_or_doubled() -> None:
    store, room = MemoryStore(), RecordingTransport(fail_writes=3)
    pcm = tone(0.2, 440)
    store.add_audio("u1", pcm)
    sender(store, room).drain()
    assert [f for f, _r, _t in room.frames] == frames_of(pcm)
    assert store.state("u1") == "sent"


def test_missing_audio_fails_the_utterance() -> None:
    store, room = MemoryStore(), RecordingTransport()
    store.add_audio("u1", tone(0.1, 440))
    store.blobs.clear()
    sender(store, room).drain()
    assert store.state("u1") == "failed"
    assert "expired or is missing" in store.records["u1"]["error"]
    assert room.frames == []


# -- the Daily path ----------------------------------------------------------------------------


class TimedDailyTransport(DailyTransport):
    """The Daily transport, noting when each write to the virtual microphone returned."""

    times: list[float]

    def write_frames(self, pcm: bytes, sample_rate: int) -> None:
        super().write_frames(pcm, sample_rate)
        self.times.append(time.monotonic())


@pytest.fixture
def fake() -> Iterator[FakeDaily]:
    sdk = FakeDaily()
    yield sdk
    shutdown_all()
    assert wait_for_cleanup(10.0)
    assert sdk.violations == [], "a client method was called from inside an SDK callback"
    assert sdk.callback_errors == []
    sdk.close()


def test_daily_frames_reach_the_custom_microphone_track_complete_and_in_order(fake: FakeDaily) -> None:
    fake.add_participant("replica")
    fake.audio_speed = 4.0  # the double's source blocks like the SDK's, four times faster
    room = TimedDailyTransport("https://example.daily.co/mic-room", settings=settings(), daily_module=fake)
    room.times = []
    room.join(5.0)
    room.wait_for_replica(5.0)
    store = MemoryStore()
    clips = [tone(0.2, 440), tone(0.15, 700)]
    store.add_audio("u1", clips[0])
    store.add_audio("u2", clips[1])
    sender(store, room).drain()

    (source,) = fake.sources
    assert (source.sample_rate, source.channels) == (RATE, 1)
    # every sample, in order, once: compared by samples, not by when they were written
    assert b"".join(source.written) == b"".join(frames_of(clips[0]) + silence(100) + frames_of(clips[1]))
    assert source.written == frames_of(clips[0]) + silence(100) + frames_of(clips[1])
    client = fake.clients[0]
    (inputs,) = client.inputs_updates
    assert inputs["microphone"]["settings"]["customTrack"]["id"] == room._tracks[RATE].track.id
    assert client.publishing_updates == [{"microphone": {"isPublishing": True}}]
    assert client.sent == []  # no app messages: the audio is the microphone track
    assert store.state("u1") == store.state("u2") == "sent"
    assert len(room.times) == len(source.written)
    room.leave()


def test_a_short_write_on_the_daily_track_is_retried_and_nothing_is_lost(fake: FakeDaily) -> None:
    fake.add_participant("replica")
    fake.audio_speed = 0
    room = TimedDailyTransport("https://example.daily.co/mic-room", settings=settings(), daily_module=fake)
    room.times = []
    room.join(5.0)
    store = MemoryStore()
    clip = tone(0.1, 440)
    store.add_audio("u1", clip)
    fake.short_writes.extend([0, 10])  # the SDK took nothing, then a tenth of a frame
    sender(store, room).drain()
    (source,) = fake.sources
    # the two short writes are on record as what the SDK took; the cursor never moved past them
    assert [len(w) for w in source.written[:2]] == [0, 20]
    assert source.written[2:] == frames_of(clip)
    assert store.state("u1") == "sent"
    room.leave()
