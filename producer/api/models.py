"""The HTTP API's request and response bodies: pydantic models, validated before a handler runs.

:mod:`producer.api` declares its routes with these; the ``/v1/schedules`` bodies are in
:mod:`producer.api.schedules`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, StrictBool, field_validator, model_validator

from worker import keys
from worker.text import text_problem

__all__ = [
    "EchoProperties",
    "EchoMessage",
    "SendResult",
    "ConversationIn",
    "CloseIn",
    "Cursor",
    "ConversationOut",
    "ClosedOut",
    "InterruptOut",
    "UtteranceIn",
    "Queued",
    "UtteranceOut",
    "HealthOut",
]

_CONV_ID = keys.CONVERSATION_ID_RE.pattern
_UTT_ID = keys.UTTERANCE_ID_RE.pattern


class EchoProperties(BaseModel):
    """``properties`` of a Tavus ``conversation.echo`` message, as the quickstart sends it."""

    model_config = ConfigDict(extra="ignore")

    modality: Literal["text", "audio"] = Field(description="text: the replica speaks `text`; audio: it lip-syncs `audio`")
    text: str | None = Field(default=None, description="what to say (modality text)")
    audio: str | None = Field(default=None, description="base64 of raw s16le mono PCM at `sample_rate` (modality audio)")
    sample_rate: int | None = Field(default=None, ge=4000, le=192000,
                                    description="rate of `audio`; 16000 when absent, as Tavus assumes")
    inference_id: str | None = Field(default=None, description="kept as the utterance's inference_id on the wire")
    done: StrictBool | Literal["true", "false"] | None = Field(
        default=None, description="false: more audio follows under the same inference_id (audio only); true or absent: the end")


class EchoMessage(BaseModel):
    """The request body of Tavus's echo quickstart: one app message."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"message_type": "conversation", "event_type": "conversation.echo", "conversation_id": "demo",
         "properties": {"modality": "text", "text": "Hello there!", "done": "true"}},
        {"message_type": "conversation", "event_type": "conversation.interrupt", "conversation_id": "demo"},
    ]})

    message_type: Literal["conversation"] = "conversation"
    event_type: Literal["conversation.echo", "conversation.interrupt"] = "conversation.echo"
    conversation_id: str = Field(pattern=_CONV_ID, description="an open echoq conversation: its echoq id, or Tavus's "
                                                               "conversation id it was opened with")
    properties: EchoProperties | None = None


class SendResult(BaseModel):
    """What ``/send_text_message`` did: the utterance queued, or how many an interrupt cancelled."""

    conversation_id: str
    utterance_id: str | None = None
    inference_id: str | None = None
    state: str
    cancelled: int | None = None


#: the fields of a conversation opened on a given room, and of one created on Tavus
_ROOM_FIELDS = ("tavus_conversation_id", "meeting_token")
_CREATE_FIELDS = ("replica_id", "conversation_name", "custom_greeting", "conversational_context")


class ConversationIn(BaseModel):
    """Open a conversation: either its ``conversation_id`` and room ``url``, or a Tavus
    ``persona_id`` for echoq to create the conversation on Tavus first."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"conversation_id": "demo", "url": "loopback://demo-room"},
        {"conversation_id": "demo", "url": "https://tavus.daily.co/c123", "tavus_conversation_id": "c123"},
        {"persona_id": "p1234567", "conversation_name": "Scripted demo"},
    ]})

    conversation_id: str | None = Field(default=None, pattern=_CONV_ID)
    url: str | None = Field(default=None, max_length=2048,
                            description="conversation_url: https://…daily.co/… or loopback://NAME")
    tavus_conversation_id: str | None = Field(
        default=None, pattern=_CONV_ID,
        description="Tavus's conversation id, sent on the wire (default: the last segment of a Daily url); "
                    "one that contradicts the url is refused")
    meeting_token: SecretStr | None = Field(
        default=None, min_length=1, max_length=8192,
        description="a private room's meeting token: sealed before it is stored, never echoed or logged")
    persona_id: str | None = Field(default=None, min_length=1, max_length=200, pattern=r"^\S+$")
    replica_id: str | None = Field(default=None, min_length=1, max_length=200, pattern=r"^\S+$")
    conversation_name: str | None = Field(default=None, max_length=500)
    custom_greeting: str | None = Field(default=None, max_length=10_000, description="what the replica says first")
    conversational_context: str | None = Field(default=None, max_length=100_000)
    mode: Literal["echo", "microphone"] = "echo"

    @field_validator("conversation_name", "custom_greeting", "conversational_context")
    @classmethod
    def _clean_text(cls, value: str | None) -> str | None:
        problem = text_problem(value) if value is not None else None
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _one_way(self) -> ConversationIn:
        if self.persona_id is not None:
            if self.conversation_id is not None or self.url is not None:
                raise ValueError("give either persona_id (create on Tavus) or conversation_id and url, not both")
            given = [n for n in _ROOM_FIELDS if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only go with conversation_id and url "
                                 "(a conversation echoq creates on Tavus has its own)")
        elif self.conversation_id is None or self.url is None:
            raise ValueError("conversation_id and url are both required (or persona_id to create on Tavus)")
        elif any(getattr(self, n) is not None for n in _CREATE_FIELDS):
            raise ValueError(f"{', '.join(_CREATE_FIELDS)} only go with persona_id")
        return self


class CloseIn(BaseModel):
    """Options for closing a conversation."""

    model_config = ConfigDict(extra="forbid")

    end_on_tavus: bool = Field(default=False, description="also end the conversation on Tavus (its room closes)")


class Cursor(BaseModel):
    seq: int
    chunk: int


class ConversationOut(BaseModel):
    """A conversation: its room, state, owner, backlog and the utterance being sent."""

    model_config = ConfigDict(extra="allow")

    id: str
    url: str | None = None
    mode: str | None = None
    state: str
    owner: str | None = None
    backlog: int = 0
    utterances: int = 0
    cursor: Cursor | None = None
    current_utterance: str | None = None
    waiting: str | None = Field(default=None, description="why no worker sends for it yet (no worker, or every "
                                                          "worker at its session limit); null once one owns it")
    tavus: dict[str, Any] | None = None


class ClosedOut(BaseModel):
    conversation_id: str
    state: str
    ended_on_tavus: bool


class InterruptOut(BaseModel):
    conversation_id: str
    cancelled: int = Field(description="queued utterances cancelled")


class UtteranceIn(BaseModel):
    """One utterance: exactly one of ``text``, ``audio_base64`` or ``audio_url``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"text": "Welcome to the demo."},
        {"audio_base64": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "format": "raw", "source_rate": 16000, "sample_rate": 16000},
    ]})

    text: str | None = Field(default=None, min_length=1, description="a text echo")
    audio_base64: str | None = Field(default=None, min_length=1, description="an audio file (or raw PCM), base64")
    audio_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://",
                                  description="an http(s) URL echoq fetches the audio from")
    format: str | None = Field(default=None, max_length=16, pattern=r"^[A-Za-z0-9]+$",
                               description="input format when it cannot be told from the data (raw for s16le PCM)")
    sample_rate: Literal[16000, 24000] | None = Field(default=None, description="rate sent to the replica")
    source_rate: int | None = Field(default=None, ge=4000, le=192000, description="rate of raw PCM input")
    channels: int = Field(default=1, ge=1, le=8, description="channels of raw PCM input")
    id: str | None = Field(default=None, pattern=_UTT_ID, description="utterance id (default: new); idempotent")
    inference_id: str | None = Field(default=None, pattern=_UTT_ID, description="inference_id on the wire")

    @model_validator(mode="after")
    def _exactly_one(self) -> UtteranceIn:
        given = [n for n in ("text", "audio_base64", "audio_url") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of text, audio_base64 or audio_url")
        return self


class Queued(BaseModel):
    utterance_id: str
    conversation_id: str
    state: str = "queued"


class UtteranceOut(BaseModel):
    """An utterance record: state, chunk counts, timings, error, replica events."""

    model_config = ConfigDict(extra="allow")

    id: str
    conversation_id: str | None = None
    inference_id: str | None = None
    kind: str | None = None
    state: str | None = None


class HealthOut(BaseModel):
    """``status`` for anyone; ``redis``, ``workers`` and ``detail`` only for a token holder."""

    status: Literal["ok", "degraded", "unavailable"]
    redis: bool | None = None
    workers: list[dict[str, Any]] | None = None
    detail: str | None = None
