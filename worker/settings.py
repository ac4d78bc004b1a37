"""One typed settings object, read from the environment with the prefix ``ECHOQ_``.

``TAVUS_API_KEY`` keeps its own name. Every tunable the protocol leaves open is here with a
default that works against Tavus and the loopback simulator alike.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
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

    # Microphone echo
    mic_frame_ms: int = Field(default=20, ge=10, le=100, description="Audio per virtual-microphone write")
    mic_max_lead_ms: int = Field(default=60, ge=0, le=1000, description="How far microphone audio may run ahead of real time")
    mic_gap_ms: int = Field(default=200, ge=0, le=5000, description="Silence between back-to-back microphone utterances")

    # Rooms
    join_timeout_s: float = Field(default=20.0, gt=0)
    replica_wait_timeout_s: float = Field(default=30.0, ge=0)
    send_timeout_s: float = Field(default=10.0, gt=0)
    replica_user_name: str | None = Field(default=None, description="Daily user name of the replica; any remote participant when unset")

    # Retries inside the sender
    retry_max_attempts: int = Field(default=8, ge=1)
    retry_base_delay_s: float = Field(default=0.05, gt=0)
    retry_max_delay_s: float = Field(default=2.0, gt=0)

    # Ownership
    lease_ttl_s: float = Field(default=10.0, gt=0)
    scan_interval_s: float = Field(default=1.0, gt=0)
    max_sessions: int = Field(default=50, ge=1, description="Conversations one worker process holds")
    worker_concurrency: int = Field(default=8, ge=1)

    # Inputs
    blob_ttl_s: int = Field(default=24 * 3600, ge=60)
    max_audio_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    max_audio_seconds: float = Field(default=600.0, gt=0)
    fetch_timeout_s: float = Field(default=20.0, gt=0)

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

    @field_validator("default_sample_rate")
    @classmethod
    def _rate(cls, v: int) -> int:
        if v not in SAMPLE_RATES:
            raise ValueError(f"must be 16000 or 24000, not {v}")
        return v

    @field_validator("log_level")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()

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
