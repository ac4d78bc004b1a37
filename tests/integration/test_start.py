"""``echoq start``: from an echo persona to a conversation open in echoq, in one step."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cryptography.fernet import Fernet
from pydantic import SecretStr

from producer.cli import main
from tests.fake_tavus import (
    FakeTavus,
    fake_tavus_fixture,  # noqa: F401  (the fake_tavus fixture)
)
from worker import keys, sealing
from worker.settings import get_settings

pytestmark = pytest.mark.redis


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_tavus: FakeTavus,
        redis_client: redis.Redis) -> Iterator[FakeTavus]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TAVUS_API_KEY", fake_tavus.api_key)
    monkeypatch.setenv("ECHOQ_TAVUS_BASE_URL", fake_tavus.url)
    get_settings.cache_clear()
    yield fake_tavus
    get_settings.cache_clear()


def test_start_creates_on_tavus_opens_in_echoq_and_prints_the_url(
    env: FakeTavus, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    persona = env.add_persona("Narrator", pipeline_mode="echo", default_replica_id="r1")
    assert main(["start", "--persona", persona["persona_id"], "--name", "demo"]) == 0
    out, err = capsys.readouterr()
    (conv_id,) = env.state.conversations
    url = env.state.conversations[conv_id]["conversation_url"]
    assert out.strip() == url  # stdout is just the URL, for scripts
    assert f"echoq say {conv_id}" in err
    record = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.conversation(conv_id)).items()}
    assert (record["url"], record["state"], record["mode"]) == (url, "open", "echo")
    assert redis_client.llen(keys.CONTROL_QUEUE) == 1  # a worker is asked to take it
    assert env.api_key not in out + err


def test_start_json_and_microphone_mode(env: FakeTavus, redis_client: redis.Redis,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    persona = env.add_persona("Mic", pipeline_mode="echo", default_replica_id="r1")
    assert main(["start", "--persona", persona["persona_id"], "--mode", "microphone", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "microphone"
    assert redis_client.hget(keys.conversation(data["conversation_id"]), "mode") == b"microphone"


def test_start_with_an_unknown_persona_opens_nothing(env: FakeTavus, redis_client: redis.Redis,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["start", "--persona", "p-missing", "--replica-id", "r1"]) == 3
    err = capsys.readouterr().err
    assert "Invalid persona_id" in err and "Traceback" not in err
    assert redis_client.smembers(keys.CONVERSATIONS) == set()


def test_start_when_redis_is_down_says_how_to_open_it_later(
    env: FakeTavus, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    persona = env.add_persona("Narrator", pipeline_mode="echo", default_replica_id="r1")
    monkeypatch.setenv("ECHOQ_REDIS_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    assert main(["start", "--persona", persona["persona_id"]]) == 4
    (conv_id,) = env.state.conversations
    err = capsys.readouterr().err
    assert f"echoq open {conv_id} --url" in err and "Redis is unreachable" in err


def test_start_private_joins_with_a_sealed_token_that_is_never_printed(
    env: FakeTavus, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("ECHOQ_SECRET_KEY", key)
    get_settings.cache_clear()
    persona = env.add_persona("Private", pipeline_mode="echo", default_replica_id="r1")
    assert main(["start", "--persona", persona["persona_id"], "--private", "--test-mode", "--json"]) == 0
    out, err = capsys.readouterr()
    (conv_id,) = env.state.conversations
    conv = env.state.conversations[conv_id]
    token = conv["meeting_token"]
    assert (conv["require_auth"], conv["test_mode"]) == (True, True)
    assert json.loads(out)["private"] is True
    assert token not in out + err
    sealed = redis_client.hget(keys.conversation(conv_id), sealing.TOKEN_FIELD)
    assert sealed is not None and token.encode() not in sealed
    assert sealing.unseal(sealed.decode(), SecretStr(key)) == token


def test_start_private_without_a_secret_key_creates_nothing(
    env: FakeTavus, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ECHOQ_SECRET_KEY", raising=False)
    get_settings.cache_clear()
    persona = env.add_persona("Private", pipeline_mode="echo", default_replica_id="r1")
    assert main(["start", "--persona", persona["persona_id"], "--private"]) == 2
    assert "ECHOQ_SECRET_KEY" in capsys.readouterr().err
    assert env.state.conversations == {}
