"""Tavus's conversation id at the HTTP API: opening with it (and a private room's meeting token),
the quickstart body that names Tavus's id finding the echoq conversation sent under it, text for
Tavus under the text rule, and a schedule's audio URL judged before the schedule is stored."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from typing import Any

import pytest
import redis
from cryptography.fernet import Fernet
from pydantic import SecretStr

from producer.client import EchoqClient
from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import Workers, heard_everything, wire
from tests.integration.test_api import Api, field_of, serve  # noqa: F401  (serve is a fixture)
from tests.integration.test_conversations import every_value
from tests.integration.test_delivery import assert_not_interleaved, by_utterance, pcm_of, utterance_order
from tests.integration.test_streams import pieces_of, voice
from worker import keys, sealing
from worker.settings import Settings

pytestmark = pytest.mark.redis

MEETING_TOKEN = "eyJhbGciOi.API-PRIVATE-ROOM.77ab3e"
RATE = 24000


@pytest.fixture
def start_api(serve: Callable[..., Api]) -> Callable[..., Api]:  # noqa: F811  (the imported fixture, by name)
    return serve


def sealed_api(start_api: Callable[..., Api]) -> tuple[Api, SecretStr]:
    key = SecretStr(Fernet.generate_key().decode())
    client = EchoqClient(settings=Settings(_env_file=None, redis_url=TEST_REDIS_URL, secret_key=key))  # type: ignore[call-arg]
    return start_api(client=client), key


def test_open_takes_the_tavus_id_and_a_meeting_token_that_is_sealed_and_never_shown(
    start_api: Callable[..., Api], redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api, key = sealed_api(start_api)
    r = api.http.post("/v1/conversations", json={"conversation_id": "demo", "url": "https://tavus.daily.co/c123",
                                                 "tavus_conversation_id": "c123", "meeting_token": MEETING_TOKEN})
    assert r.status_code == 201, r.text
    conv = r.json()
    assert conv["wire_id"] == "c123" and conv["private"] is True and conv["url"] == "https://tavus.daily.co/c123"
    assert MEETING_TOKEN not in r.text and sealing.TOKEN_FIELD not in conv
    sealed = redis_client.hget(keys.conversation("demo"), sealing.TOKEN_FIELD)
    assert sealed is not None and sealing.unseal(sealed.decode(), key) == MEETING_TOKEN  # what the worker joins with
    assert not any(MEETING_TOKEN.encode() in v for v in every_value(redis_client)), "the token is in Redis as it is"
    assert redis_client.get(keys.wire("c123")) == b"demo"

    # the client's conflict rule, as a 422 naming the field; nothing written
    r = api.http.post("/v1/conversations", json={"conversation_id": "other", "url": "https://tavus.daily.co/c123",
                                                 "tavus_conversation_id": "c999", "meeting_token": MEETING_TOKEN})
    assert field_of(r) == ["body", "tavus_conversation_id"] and "'c123'" in r.text and MEETING_TOKEN not in r.text
    assert redis_client.exists(keys.conversation("other"), keys.wire("c999")) == 0
    for body, loc in [
        ({"tavus_conversation_id": "c 1"}, ["body", "tavus_conversation_id"]),
        ({"meeting_token": 12345}, ["body", "meeting_token"]),
        ({"meeting_token": ""}, ["body", "meeting_token"]),
    ]:
        r = api.http.post("/v1/conversations", json={"conversation_id": "bad", "url": "loopback://bad", **body})
        assert field_of(r) == loc, r.text
        assert "12345" not in r.text
    r = api.http.post("/v1/conversations", json={"persona_id": "p1", "meeting_token": MEETING_TOKEN})
    assert field_of(r) == ["body"] and "meeting_token only go with conversation_id" in r.text
    assert MEETING_TOKEN not in r.text
    assert redis_client.exists(keys.conversation("bad")) == 0

    # a token and no key to seal it with: a clear 503 that writes nothing
    plain = start_api(client=EchoqClient(settings=Settings(_env_file=None, redis_url=TEST_REDIS_URL)))  # type: ignore[call-arg]
    r = plain.http.post("/v1/conversations", json={"conversation_id": "nokey", "url": "https://tavus.daily.co/c5",
                                                   "meeting_token": MEETING_TOKEN})
    assert r.status_code == 503 and "ECHOQ_SECRET_KEY" in r.json()["detail"] and MEETING_TOKEN not in r.text
    assert redis_client.exists(keys.conversation("nokey")) == 0
    assert all(MEETING_TOKEN not in rec.getMessage() for rec in caplog.records)


def test_text_for_tavus_follows_the_text_rule_at_the_api(start_api: Callable[..., Api], redis_client: redis.Redis) -> None:
    api = start_api()
    for field in ("conversation_name", "custom_greeting", "conversational_context"):
        r = api.http.post("/v1/conversations", json={"persona_id": "p1", field: "hi\x1b[2Jthere"})
        assert field_of(r) == ["body", field], r.text
        assert "control character U+001B at index 2" in r.json()["detail"][0]["msg"]
    r = api.http.post("/v1/conversations", json={"conversation_id": "c", "url": "loopback://c", "custom_greeting": "hi"})
    assert field_of(r) == ["body"] and "only go with persona_id" in r.text
    assert not redis_client.keys("echoq:conv:*")


def test_the_index_follows_reopens_and_expires_with_the_conversation(redis_client: redis.Redis) -> None:
    c = EchoqClient(settings=Settings(_env_file=None, redis_url=TEST_REDIS_URL, retention_s=600))  # type: ignore[call-arg]
    c.open("a", "loopback://room-a", tavus_conversation_id="t1")
    assert redis_client.get(keys.wire("t1")) == b"a"
    assert (c.by_wire_id("t1"), c.by_wire_id("a"), c.by_wire_id("nobody")) == ("a", "a", "nobody")
    c.open("same", "loopback://room-s")  # the ids agree: no index key
    assert redis_client.exists(keys.wire("same")) == 0 and c.by_wire_id("same") == "same"

    c.close("a")
    c.open("a", "loopback://room-a", tavus_conversation_id="t2")  # reopened under another Tavus id
    assert redis_client.exists(keys.wire("t1")) == 0 and redis_client.get(keys.wire("t2")) == b"a"
    assert c.by_wire_id("t1") == "t1"
    c.open("b", "loopback://room-b", tavus_conversation_id="t2")  # the last one opened under t2 takes it
    assert redis_client.get(keys.wire("t2")) == b"b" and c.by_wire_id("t2") == "b"

    c.close("a")  # "a" no longer holds t2: its retention leaves b's key alone
    assert redis_client.ttl(keys.wire("t2")) == -1
    c.close("b")
    assert 0 < redis_client.ttl(keys.wire("t2")) <= 600
    c.open("b", "loopback://room-b", tavus_conversation_id="t2")  # reopened: kept again
    assert redis_client.ttl(keys.wire("t2")) == -1


def test_the_quickstart_body_with_tavus_id_reaches_the_conversation_opened_under_it(
    workers: Workers, simulator: Any, start_api: Callable[..., Api], redis_client: redis.Redis
) -> None:
    workers.start(1)
    api = start_api()
    r = api.http.post("/v1/conversations", json={"conversation_id": "ours", "url": "loopback://room-w",
                                                 "tavus_conversation_id": "tavus-w1"})
    assert r.status_code == 201 and r.json()["wire_id"] == "tavus-w1", r.text
    base = {"message_type": "conversation", "event_type": "conversation.echo", "conversation_id": "tavus-w1"}

    r = api.http.post("/send_text_message", json={**base, "properties": {"modality": "text", "text": "Hello there!",
                                                                         "inference_id": "w-text", "done": "true"}})
    assert r.status_code == 200 and r.json()["conversation_id"] == "ours", r.text
    api.wait_state(r.json()["utterance_id"])

    # streamed over several requests (done false ... done true) under Tavus's id
    pcm = voice(0.5)
    parts = pieces_of(pcm, 4800)  # 100 ms per request
    answers = []
    for i, part in enumerate(parts):
        props = {"modality": "audio", "audio": base64.b64encode(part).decode(), "sample_rate": RATE,
                 "inference_id": "w-stream", "done": "true" if i == len(parts) - 1 else "false"}
        r = api.http.post("/send_text_message", json={**base, "properties": props})
        assert r.status_code == 200, r.text
        answers.append(r.json())
    assert [a["state"] for a in answers] == ["streaming"] * (len(parts) - 1) + ["finished"]
    assert {a["utterance_id"] for a in answers} == {answers[0]["utterance_id"]}
    assert api.wait_state(answers[0]["utterance_id"])["conversation_id"] == "ours"

    messages = wire(redis_client, "room-w")
    assert {m["conversation_id"] for m in messages} == {"tavus-w1"}
    mine = by_utterance(messages)
    assert utterance_order(messages) == ["w-text", "w-stream"]
    assert_not_interleaved(messages)
    assert [m["properties"]["text"] for m in mine["w-text"]] == ["Hello there!"]
    assert b"".join(pcm_of(mine["w-stream"])) == pcm  # every sample, none twice
    assert [m["properties"]["done"] for m in mine["w-stream"]] == [False] * (len(mine["w-stream"]) - 1) + [True]
    report = heard_everything(simulator, redis_client, "room-w")
    assert [u["inference_id"] for u in report["utterances"]] == ["w-text", "w-stream"] and report["violations"] == []

    # an interrupt under Tavus's id reaches it too; an id nobody opened is 404 as before
    r = api.http.post("/send_text_message", json={**base, "event_type": "conversation.interrupt"})
    assert r.status_code == 200 and r.json()["state"] == "interrupted", r.text
    r = api.http.post("/send_text_message", json={**base, "conversation_id": "tavus-none",
                                                  "properties": {"modality": "text", "text": "x"}})
    assert r.status_code == 404 and "tavus-none" in r.json()["detail"]
    # closed: Tavus's id finds it, and it is not open
    assert api.http.post("/v1/conversations/ours/close").status_code == 202
    r = api.http.post("/send_text_message", json={**base, "properties": {"modality": "text", "text": "late"}})
    assert r.status_code == 404 and "'ours'" in r.json()["detail"]


def test_a_schedule_whose_audio_url_is_internal_is_refused_before_it_is_stored(
    start_api: Callable[..., Api], redis_client: redis.Redis
) -> None:
    api = start_api()
    script = {"conversation": "c", "lines": [{"text": "hi"}, {"audio": "http://169.254.169.254/latest/meta-data"}]}
    r = api.http.post("/v1/schedules", json={"script": script, "every": "1h"})
    assert field_of(r) == ["body", "script", "lines", 1, "audio"], r.text
    assert "a link-local address" in r.json()["detail"][0]["msg"]
    assert not redis_client.keys("echoq:schedule*")
