"""One loopback room as the replica simulator sees it. Pure: no Redis, no files; time is passed in.

A :class:`Room` takes the room's app messages in stream order and keeps three things:

Sequence rules (each break is a :class:`Violation`, ``kind`` in brackets):

- every message must pass :func:`worker.echo.validate` [``invalid``]; an invalid message is
  counted and otherwise ignored, as a room that dropped it would;
- the chunks of one ``inference_id`` are contiguous: a message for X right after a message for
  another Y while Y is unfinished, or resuming X after another id while X is unfinished, is
  [``interleaved``] (the message itself is still used);
- nothing for X after X's ``done`` [``after done``] — unless other utterances started since, then
  X is being started again [``reused inference_id``]; nothing for X after an interrupt cut X
  [``after interrupt``]; such messages are ignored;
- ``modality`` and ``sample_rate`` stay the same within an utterance [``modality changed``,
  ``sample_rate changed``]; the content of such a message is left out, its ``done`` still counts.

Reassembly: audio chunks are base64-decoded and concatenated in arrival order; text parts are
concatenated. An utterance ends when ``done`` arrives or an interrupt cuts it; it is then put
on :attr:`Room.finished` for the simulator to write out.

Playback, in real time divided by ``speed``: one player per room plays utterances in the order
their first message arrived. An utterance starts as soon as it has its first chunk; when its
buffer runs dry before ``done`` the player waits (waiting is not counted as playing). A text
utterance plays for ``max(0.5, words / 2.5)`` seconds. ``conversation.interrupt`` stops the
current utterance at once (``stopped_speaking`` with ``interrupted: true``) and drops the
utterances received but not yet started: no event is emitted for those (they never spoke);
the report marks them ``interrupted`` with ``played`` 0. Every utterance still being received
is cut. Events go to :attr:`Room.events`; ``seq`` increases per room, ``turn_idx`` is the
utterance's 0-based arrival index in the room.
"""

from __future__ import annotations

import base64
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from worker import echo

TEXT_WORDS_PER_SECOND = 2.5
TEXT_MIN_SECONDS = 0.5


def text_seconds(text: str) -> float:
    """How long the simulated replica takes to say ``text``."""
    return max(TEXT_MIN_SECONDS, len(text.split()) / TEXT_WORDS_PER_SECOND)


@dataclass
class Violation:
    """One break of the protocol in one room."""

    room: str
    inference_id: str | None
    kind: str
    problem: str
    entry_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "room": self.room,
            "inference_id": self.inference_id,
            "kind": self.kind,
            "problem": self.problem,
            "entry_id": self.entry_id,
        }


@dataclass(eq=False)
class Utterance:
    """Everything received under one ``inference_id``, and how much of it was played."""

    inference_id: str
    conversation_id: str
    modality: str
    turn_idx: int
    sample_rate: int | None = None
    pcm: bytearray = field(default_factory=bytearray)
    text: str = ""
    chunks: int = 0
    done: bool = False
    cut: bool = False  # an interrupt arrived before done
    interrupted: bool = False  # playback stopped, or never started, because of an interrupt
    played: float = 0.0  # audio seconds played
    violations: int = 0
    path: str | None = None  # the .wav or .txt written for it

    @property
    def seconds(self) -> float:
        """Audio seconds received so far (the text estimate for text)."""
        if self.modality == "audio":
            return len(self.pcm) / 2 / (self.sample_rate or 16000)
        return text_seconds(self.text) if self.text else 0.0

    @property
    def ended(self) -> bool:
        return self.done or self.cut

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "inference_id": self.inference_id,
            "conversation_id": self.conversation_id,
            "turn_idx": self.turn_idx,
            "modality": self.modality,
            "chunks": self.chunks,
            "bytes": len(self.pcm) if self.modality == "audio" else len(self.text.encode()),
            "sample_rate": self.sample_rate,
            "duration": round(self.seconds, 4),
            "played": round(self.played, 4),
            "done": self.done,
            "interrupted": self.interrupted or self.cut,
            "violations": self.violations,
        }
        if self.modality == "audio":
            out["wav"] = self.path
        else:
            out["txt"] = self.path
            out["text"] = self.text
        return out


class Room:
    """Sequence rules, reassembly and the player of one room; see the module docstring."""

    def __init__(self, name: str, *, speed: float = 1.0, max_message_bytes: int = 4096) -> None:
        self.name = name
        self.speed = speed
        self.max_message_bytes = max_message_bytes
        self.messages = 0
        self.utterances: dict[str, Utterance] = {}  # arrival order
        self.violations: list[Violation] = []
        # outboxes, drained by the simulator
        self.events: list[dict[str, Any]] = []
        self.new_violations: list[Violation] = []
        self.finished: list[Utterance] = []
        self._ended: dict[str, str] = {}  # inference_id -> "done" | "interrupt"
        self._open: dict[str, Utterance] = {}  # started, not yet done nor cut
        self._prev: str | None = None  # inference_id of the previous echo message
        self._last_started: str | None = None
        self._queue: deque[Utterance] = deque()
        self._current: Utterance | None = None
        self._pos_wall = 0.0  # monotonic time up to which _current.played is accounted
        self._seq = 0

    @property
    def busy(self) -> bool:
        """Whether something is playing or waiting to play."""
        return self._current is not None or bool(self._queue)

    def open_utterances(self) -> list[Utterance]:
        """Utterances still being received (neither done nor cut)."""
        return list(self._open.values())

    def violation(self, inference_id: str | None, kind: str, problem: str, entry_id: str | None = None) -> None:
        """Record a violation found by the caller (bad JSON, bad mic frame) or by the rules here."""
        v = Violation(self.name, inference_id, kind, problem, entry_id)
        self.violations.append(v)
        self.new_violations.append(v)
        if inference_id is not None and inference_id in self.utterances:
            self.utterances[inference_id].violations += 1

    def handle(self, message: Any, now: float, entry_id: str | None = None) -> None:
        """Take one app message that arrived at monotonic time ``now``."""
        self.messages += 1
        self.advance(now)
        problems = echo.validate(message, max_bytes=self.max_message_bytes)
        if problems:
            iid = _inference_id(message)
            for problem in problems:
                self.violation(iid, "invalid", problem, entry_id)
            return
        if message["event_type"] == echo.INTERRUPT:
            self._interrupt(now)
            return
        self._echo(message, now, entry_id)
        self.advance(now)

    def _echo(self, message: dict[str, Any], now: float, entry_id: str | None) -> None:
        props = message["properties"]
        iid: str = props["inference_id"]
        ended = self._ended.get(iid)
        if ended is not None:
            if ended == "interrupt":
                self.violation(iid, "after interrupt", f"message for {iid} after an interrupt cut it", entry_id)
            elif iid == self._last_started:
                self.violation(iid, "after done", f"message for {iid} after its done", entry_id)
            else:
                self.violation(iid, "reused inference_id", f"{iid} already finished and starts again", entry_id)
            return
        utt = self._open.get(iid)
        prev = self._prev
        if prev is not None and prev != iid and (prev in self._open or utt is not None):
            other = prev if prev in self._open else iid
            self.violation(iid, "interleaved", f"message for {iid} after one for {prev} while {other} is unfinished", entry_id)
        self._prev = iid
        modality = props["modality"]
        if utt is None:
            utt = Utterance(
                inference_id=iid,
                conversation_id=message["conversation_id"],
                modality=modality,
                turn_idx=len(self.utterances),
                sample_rate=props["sample_rate"] if modality == "audio" else None,
            )
            self.utterances[iid] = utt
            self._open[iid] = utt
            self._last_started = iid
            self._queue.append(utt)
        utt.chunks += 1
        if modality != utt.modality:
            self.violation(iid, "modality changed", f"{iid} changed modality from {utt.modality} to {modality}", entry_id)
        elif modality == "audio" and props["sample_rate"] != utt.sample_rate:
            self.violation(
                iid, "sample_rate changed", f"{iid} changed sample_rate from {utt.sample_rate} to {props['sample_rate']}", entry_id
            )
        elif modality == "audio":  # handle() has played up to now before the buffer grows
            utt.pcm += base64.b64decode(props["audio"])
        else:
            utt.text += props["text"]
        if props["done"]:
            utt.done = True
            del self._open[iid]
            self._ended[iid] = "done"
            self.finished.append(utt)

    def _interrupt(self, now: float) -> None:
        self.advance(now)
        current = self._current
        if current is not None:
            current.interrupted = True
            self._emit(echo.STOPPED_SPEAKING, current, interrupted=True)
            self._current = None
        for utt in self._queue:
            utt.interrupted = True
        self._queue.clear()
        for iid, utt in self._open.items():
            utt.cut = True
            self._ended[iid] = "interrupt"
            self.finished.append(utt)
        self._open.clear()
        self._prev = None

    def advance(self, now: float) -> None:
        """Play up to monotonic time ``now``: finish, start and account utterances."""
        start_at = now
        while True:
            current = self._current
            if current is None:
                if not self._queue:
                    return
                current = self._current = self._queue.popleft()
                self._pos_wall = start_at
                self._emit(echo.STARTED_SPEAKING, current)
                continue
            available = current.seconds
            if current.done:
                end_at = self._pos_wall + max(0.0, available - current.played) / self.speed
                if now >= end_at:
                    current.played = available
                    self._emit(echo.STOPPED_SPEAKING, current, interrupted=False)
                    self._current = None
                    start_at = end_at
                    continue
            current.played = min(available, current.played + max(0.0, now - self._pos_wall) * self.speed)
            self._pos_wall = now
            return

    def next_deadline(self) -> float | None:
        """Monotonic time at which the current utterance ends, when that is known."""
        current = self._current
        if current is None or not current.done:
            return None
        return self._pos_wall + max(0.0, current.seconds - current.played) / self.speed

    def _emit(self, event_type: str, utt: Utterance, *, interrupted: bool | None = None) -> None:
        self._seq += 1
        event: dict[str, Any] = {
            "message_type": echo.MESSAGE_TYPE,
            "event_type": event_type,
            "conversation_id": utt.conversation_id,
            "inference_id": utt.inference_id,
            "seq": self._seq,
            "turn_idx": utt.turn_idx,
        }
        if interrupted is not None:
            event["properties"] = {"duration": round(utt.played, 4), "interrupted": interrupted}
        self.events.append(event)


def _inference_id(message: Any) -> str | None:
    if isinstance(message, dict) and isinstance(message.get("properties"), dict):
        iid = message["properties"].get("inference_id")
        if isinstance(iid, str) and iid:
            return iid
    return None
