"""One typed settings object, read from the environment with the prefix ``ECHOQ_``.

``TAVUS_API_KEY`` keeps its own name. Every tunable the protocol leaves open is here with a
default that works against Tavus and the loopback simulator alike.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SAMPLE_RATES = (16000, 24000)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ECHOQ_", env_file=".env", extra="ignore")

    # Connections
    redis_url: str = "redis://localhost:6379/0"
    broker_url: str | None = Field(default=None, description="Celery broker; defaults to redis_url")

    # Wire format
    max_message_bytes: int = Field(default=4096, ge=512, description="Largest app message, compact JSON bytes")
    chunk_ms: int = Field(default=40, ge=10, le=1000, description="Audio per echo message")
    default_sample_rate: int = Field(default=24000, description="16000 or 24000")

    # Pacing
    pacing: Literal["burst", "realtime"] = "burst"
    max_messages_per_second: float = Field(default=0.0, ge=0, description="0 means no limit")
    pacing_loop: bool = Field(default=True, description="realtime: one loop paces every room's audio (false: a pool "
                              "thread per playing room)")

    # Microphone echo
    mic_frame_ms: int = Field(default=20, ge=10, le=100, description="Audio per microphone-track write, a multiple of 10 ms")
    mic_max_lead_ms: int = Field(default=60, ge=0, le=1000, description="How far microphone audio may run ahead of real time")
    mic_gap_ms: int = Field(default=200, ge=0, le=5000, description="Silence between back-to-back microphone utterances")

    # Rooms
    join_timeout_s: float = Field(default=20.0, gt=0)
    replica_wait_timeout_s: float = Field(default=30.0, ge=0)
    send_timeout_s: float = Field(default=10.0, gt=0)
    replica_user_name: str | None = Field(
        default=None,
        description="Daily user name of the replica; when unset, the participant that sends the replica's events "
                    "(any remote participant until one has)")
    secret_key: SecretStr | None = Field(default=None, description="Fernet key sealing meeting tokens in Redis")

    # Retries inside the sender
    retry_max_attempts: int = Field(default=8, ge=1)
    retry_base_delay_s: float = Field(default=0.05, gt=0)
    retry_max_delay_s: float = Field(default=2.0, gt=0)

    # Ownership
    lease_ttl_s: float = Field(default=10.0, gt=0)
    lease_safety_margin_s: float | None = Field(
        default=None, ge=0,
        description="How long before its lease runs out a sender stops sending; a quarter of the TTL when unset")
    redis_retry_max_delay_s: float = Field(default=1.0, gt=0, description="Longest pause between retries while Redis is down")
    scan_interval_s: float = Field(default=1.0, gt=0)
    max_sessions: int = Field(default=50, ge=1, description="Conversations one worker process holds")
    worker_concurrency: int = Field(default=8, ge=1)

    # Shedding: a worker that cannot keep up stops adopting and lets conversations go, one at a time
    shed_late_fraction: float = Field(
        default=0.25, ge=0, lt=1,
        description="Supervisor scans that wake later than this fraction of lease_ttl_s, twice in a row, "
                    "mean the worker cannot keep up; 0 turns this signal off")
    shed_late_chunks: int = Field(
        default=10, ge=0,
        description="A real-time conversation whose audio fell too far behind to catch up (over 200 ms) this many times in one "
                    "lease TTL is behind; two or more behind, and at least half of the real-time ones, mean the "
                    "worker cannot keep up; 0 turns this signal off")
    shed_cooldown_s: float = Field(
        default=30.0, gt=0,
        description="How long after it last could not keep up a worker adopts nothing (and does not take back "
                    "what it let go)")

    # Scheduler (`echoq beat`): a standby takes over at most lock timeout + max interval after
    # the active beat dies, and within one max interval after it stops cleanly
    beat_max_interval_s: float = Field(default=1.0, gt=0, description="Longest sleep between beat ticks; also how often a standby retries the lock")
    beat_lock_timeout_s: float = Field(default=5.0, gt=0, description="TTL of the active beat's lock, renewed every tick")

    # Retention: how long a closed conversation's keys stay in Redis
    retention_s: int = Field(default=24 * 3600, ge=1, description="Seconds a closed conversation's log, records, events and blobs are kept")

    # Inputs
    blob_ttl_s: int = Field(default=24 * 3600, ge=60)
    max_audio_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    max_audio_seconds: float = Field(default=600.0, gt=0)
    warm_decoder: bool = Field(default=True, description="Keep one ffmpeg started ahead of need in each worker, so "
                               "the first audio of an MP3, AAC, Ogg, FLAC or WAV comes out without waiting about "
                               "0.1 s for ffmpeg to start; false: every decode starts its own")
    gc_freeze: bool = Field(default=True, description="Once a worker is ready, move every object alive then out of "
                            "the garbage collector's reach (gc.freeze), so a full collection walks only what came "
                            "after: full collections of everything stalled every paced room for ~0.2 s")
    fetch_timeout_s: float = Field(default=20.0, gt=0, description="Total deadline of one audio URL fetch, redirects included")
    fetch_allow_hosts: str = Field(default="", description="Comma-separated hosts, addresses or CIDR networks "
                                   "that audio URLs may reach although they are internal")

    # Streams (utterances whose audio arrives in pieces)
    stream_idle_s: float = Field(default=10.0, gt=0, description="A stream with no new piece this long is ended")
    stream_end_ms: int = Field(default=40, ge=0, le=1000,
                               description="Silence in the done message of a stream finished without a last piece; "
                                           "0 sends an empty audio message")

    # Operations
    log_json: bool = False
    log_level: str = "INFO"
    metrics_port: int = Field(default=0, ge=0, description="Prometheus port on each worker; 0 turns it off")
    api_tokens: str = Field(default="", description="Comma-separated bearer tokens for the HTTP API")

    # Tavus
    tavus_api_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices("TAVUS_API_KEY", "ECHOQ_TAVUS_API_KEY"))
    tavus_base_url: str = "https://tavusapi.com/v2"
    # How a persona's transport says "microphone enabled" is not settled publicly: this default is
    # what a Tavus-authored pipecat change checks (layers.transport.input_settings.microphone).
    tavus_microphone_layers: dict[str, Any] = Field(
        default={"transport": {"input_settings": {"microphone": "enabled"}}},  # pydantic copies it per instance
        description="Persona layers (JSON) that `echoq tavus persona create --microphone` merges in")

    @field_validator("default_sample_rate")
    @classmethod
    def _rate(cls, v: int) -> int:
        if v not in SAMPLE_RATES:
            raise ValueError(f"must be 16000 or 24000, not {v}")
        return v

    @field_validator("mic_frame_ms")
    @classmethod
    def _whole_10ms(cls, v: int) -> int:
        # Daily's audio source pads any other length with silence: holes in the track.
        if v % 10:
            raise ValueError(f"must be a multiple of 10 ms (Daily pads other lengths with silence), not {v}")
        return v

    @field_validator("log_level")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()

    @model_validator(mode="after")
    def _fence(self) -> Settings:
        # the lease is renewed every third of its TTL (plus one scan): a margin past what is left
        # after that would close the fence between two renewals of a healthy owner
        if self.lease_margin_s >= self.lease_ttl_s * 2 / 3 - self.scan_interval_s:
            raise ValueError(f"lease_safety_margin_s ({self.lease_margin_s:g}) must be under two thirds of "
                             f"lease_ttl_s ({self.lease_ttl_s:g}) minus scan_interval_s ({self.scan_interval_s:g})")
        return self

    @property
    def lease_margin_s(self) -> float:
        """The safety margin of the send fence (see :class:`worker.sender.Fence`)."""
        if self.lease_safety_margin_s is None:
            return self.lease_ttl_s / 4
        return self.lease_safety_margin_s

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def api_token_list(self) -> list[str]:
        return [t.strip() for t in self.api_tokens.split(",") if t.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
