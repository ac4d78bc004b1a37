"""Judging a room's stream after a fault: lost, repeated and reordered pieces, and the protocol.

The stream ``echoq:loopback:<room>`` holds every app message exactly as it went on the wire
(field ``data``) and, beside it, the lease token of the process that sent it (field ``origin``).
:func:`judge` compares it with what was enqueued and counts what a fault can break.
"""

from __future__ import annotations

import base64
import json
import math
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis

from worker import audio, chunks, keys
from worker.settings import get_settings
from worker.simulator.files import write_wav


@dataclass
class Sent:
    entry_id: str
    origin: str
    message: dict[str, Any]

    @property
    def ms(self) -> int:
        """When Redis took it (the stream id's milliseconds)."""
        return int(self.entry_id.split("-")[0])


@dataclass
class Verdict:
    """What one room received, against what was enqueued."""

    utterances: int = 0
    chunks: int = 0
    messages: int = 0
    lost: int = 0
    repeated: int = 0
    reordered: int = 0
    interleaved: int = 0
    reused: int = 0
    bad_ends: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, other: Verdict) -> Verdict:
        for name in ("utterances", "chunks", "messages", "lost", "repeated", "reordered", "interleaved", "reused",
                     "bad_ends"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.problems += other.problems
        return self

    def figures(self) -> dict[str, Any]:
        out = asdict(self)
        out["problems"] = out["problems"][:5]
        return out


def sent(client: redis.Redis, room: str) -> list[Sent]:
    """Every message in a loopback room, in order, with the token of the process that sent it."""
    return [Sent(eid.decode(), (f.get(b"origin") or b"").decode(), json.loads(f[b"data"]))
            for eid, f in client.xrange(keys.loopback_room(room))]


def noise_wav(path: Path, seconds: float, seed: int, rate: int = 24000) -> Path:
    """Mono s16 noise at 24 kHz: every 40 ms chunk differs, so a repeat is a repeat, not a tone's period."""
    samples = (np.random.default_rng(seed).uniform(-0.3, 0.3, int(seconds * rate)) * 32767).astype("<i2")
    write_wav(path, samples.tobytes(), rate)
    return path


def expected_chunks(path: Path, rate: int = 24000, chunk_ms: int | None = None) -> list[bytes]:
    s = get_settings()
    pcm = audio.convert(path.read_bytes(), target_rate=rate, max_bytes=s.max_audio_bytes, max_seconds=s.max_audio_seconds)
    return list(chunks.rechunk([pcm], chunks.chunk_bytes(rate, chunk_ms or s.chunk_ms)))


def ffmpeg_file(path: Path, *args: str) -> Path:
    """Write ``path`` with ffmpeg (a lavfi source or a conversion); ffmpeg is what decodes audio here anyway."""
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args, str(path)], check=True)
    return path


def judge(stream: list[Sent], expected: list[tuple[str, str | list[bytes]]], *, may_cut: frozenset[str] = frozenset()
          ) -> Verdict:
    """Count what went wrong in a room.

    ``expected``: (inference id, text or audio chunks) in enqueue order. ``may_cut``: ids that may
    end with ``conversation.interrupt`` instead of ``done`` (their missing tail is not lost; with
    no chunks given, their content is not compared).
    """
    v = Verdict(utterances=len(expected), messages=len(stream))
    echoes = [s.message for s in stream]
    # order: ids by first appearance must be the enqueued order
    seen: list[str] = []
    for m in echoes:
        if m.get("event_type") == "conversation.echo" and (iid := m["properties"]["inference_id"]) not in seen:
            seen.append(iid)
    want_order = [iid for iid, _ in expected if iid in seen]
    v.reordered += sum(1 for a, b in zip(seen, want_order, strict=False) if a != b)
    v.reordered += len(set(seen) - {iid for iid, _ in expected})
    # the protocol: one utterance at a time, nothing after its done, a cut one closed by an interrupt
    current: str | None = None
    finished: set[str] = set()
    cut: set[str] = set()
    for m in echoes:
        if m.get("event_type") == "conversation.interrupt":
            if current is not None:
                cut.add(current)
            current = None
            continue
        props = m["properties"]
        iid = props["inference_id"]
        if iid in finished or iid in cut:
            v.reused += 1
            v.problems.append(f"{iid} sent again after it ended")
        if current not in (None, iid):
            v.interleaved += 1
            v.problems.append(f"{iid} started while {current} was unfinished")
        current = iid
        if props.get("done") is True:
            finished.add(iid)
            current = None
    for iid, want in expected:
        msgs = [m for m in echoes if m.get("event_type") == "conversation.echo" and m["properties"]["inference_id"] == iid]
        dones = [m["properties"].get("done") is True for m in msgs]
        if isinstance(want, str):
            v.chunks += 1
            texts = [m["properties"].get("text") for m in msgs]
            v.lost += 0 if want in texts else 1
            v.repeated += max(0, texts.count(want) - 1)
            v.reordered += sum(1 for t in texts if t != want)
            continue
        if not want and iid in may_cut:  # content not known ahead (it fails part-way): counted, not compared
            v.chunks += len(msgs)
            continue
        v.chunks += len(want)
        got = [base64.b64decode(m["properties"]["audio"]) for m in msgs]
        matched, repeats, strays = _match(got, want)
        if repeats:
            origins = [s.origin.split(":")[0] for s in stream if s.message.get("event_type") == "conversation.echo"
                       and s.message["properties"]["inference_id"] == iid]
            v.problems.append(f"{iid}: {repeats} repeated chunk(s); senders in order {_runs(origins)}")
        v.repeated += repeats
        v.reordered += strays
        if iid in may_cut and iid in cut and not any(dones):
            continue  # ended by conversation.interrupt: what it did not send is not lost
        v.lost += len(want) - matched
        if dones.count(True) != 1 or not dones or not dones[-1]:
            v.bad_ends += 1
            v.problems.append(f"{iid}: done flags {dones.count(True)} true, last {dones[-1] if dones else None}")
    return v


def _runs(items: list[str]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for x in items:
        if out and out[-1][0] == x:
            out[-1] = (x, out[-1][1] + 1)
        else:
            out.append((x, 1))
    return out


def _match(got: list[bytes], want: list[bytes]) -> tuple[int, int, int]:
    """(pieces of ``want`` found in order, pieces repeated right after themselves, pieces out of place)."""
    j = repeats = strays = 0
    for piece in got:
        if j < len(want) and piece == want[j]:
            j += 1
        elif j > 0 and piece in want[max(0, j - 2):j]:
            repeats += 1
        else:
            strays += 1
    return j, repeats, strays


def audio_seconds(msgs: list[Sent]) -> float:
    """Seconds of audio in these echo messages."""
    total = 0.0
    for s in msgs:
        p = s.message.get("properties") or {}
        if p.get("modality") == "audio":
            total += len(base64.b64decode(p["audio"])) / (2 * int(p.get("sample_rate") or 16000))
    return total


def pace(msgs: list[Sent]) -> float:
    """Audio seconds per wall second over these messages (1.0 is real time; burst is far above)."""
    if len(msgs) < 2:
        return math.nan
    wall = (msgs[-1].ms - msgs[0].ms) / 1000
    return audio_seconds(msgs[1:]) / wall if wall > 0 else math.inf
