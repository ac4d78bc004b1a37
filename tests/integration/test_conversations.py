"""Opening conversations as Tavus hands them out: its conversation id on the wire, private rooms
whose meeting token stays a secret, reopening, and closing one whose room never joined."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.fernet import Fernet
from pydantic import SecretStr

from producer.client import EchoqClient
from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import Workers, running_simulator, wait_for, wire
from tests.integration.test_delivery import tone_wav
from worker import keys, sealing
from worker.errors import ConfigError, InvalidInput
from worker.settings import Settings

pytestmark = pytest.mark.redis

TOKEN = "eyJhbGciOi.PRIVATE-ROOM-TOKEN.5f2c9e"


def echoq(**settings: Any) -> EchoqClient:
    return EchoqClient(settings=Settings(_env_file=None, redis_url=TEST_REDIS_URL, **settings))  # type: ignore[call-arg]


def every_value(r: redis.Redis) -> list[bytes]:
    """Every value held in the test database, whatever its type."""
    out: list[bytes] = []
    for key in r.scan_iter():
        kind = r.type(key)
        if kind == b"string":
            out.append(r.get(key) or b"")
        elif kind == b"hash":
            out += [k + b"=" + v for k, v in r.hgetall(key).items()]
        elif kind == b"list":
            out += r.lrange(key, 0, -1)
        elif kind == b"set":
            out += list(r.smembers(key))
        elif kind == b"stream":
            out += [b"".join(k + v for k, v in f.items()) for _id, f in r.xrange(key)]
    return out


# -- Tavus's conversation id -------------------------------------------------------------------


def test_the_tavus_id_comes_from_the_room_url(redis_client: redis.Redis) -> None:
    c = echoq()
    assert c.open("demo", "https://tavus.daily.co/c123")["wire_id"] == "c123"
    assert c.open("same", "https://tavus.daily.co/c456/", tavus_conversation_id="c456")["wire_id"] == "c456"
    assert c.open("loop", "loopback://room-l")["wire_id"] == "loop"  # loopback rooms keep echoq's id


def test_a_tavus_id_that_contradicts_the_url_is_refused_and_nothing_is_written(redis_client: redis.Redis) -> None:
    with pytest.raises(InvalidInput, match="'c999'.*'c123'"):
        echoq().open("demo", "https://tavus.daily.co/c123", tavus_conversation_id="c999")
    assert redis_client.exists(keys.conversation("demo")) == 0


def test_the_wire_carries_the_tavus_id_and_an_interrupt_cuts_what_is_still_playing(
    workers: Workers, client: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    workers.start(1)
    # real time: the replica is still speaking the clip when it goes quiet (the simulator stops
    # here, so no replica event can settle the outcome): the interrupt alone must end it
    with running_simulator(redis_client, tmp_path / "sim", speed=1.0):
        client.open("ours", "loopback://room-t", tavus_conversation_id="tavus-c1")
        uid = client.play("ours", tone_wav(tmp_path / "clip.wav", 4.0, 440))
        assert client.wait(uid, timeout=30)["state"] == "sent"
        wait_for(lambda: client.status(uid).get("spoken_started_at"), 15, what="the replica to start speaking")
    client.interrupt("ours")
    assert client.wait(uid, timeout=15, states=("interrupted", "spoken"))["state"] == "interrupted"
    wait_for(lambda: any(m["event_type"] == "conversation.interrupt" for m in wire(redis_client, "room-t")),
             15, what="the interrupt on the wire")
    messages = wire(redis_client, "room-t")
    assert {m["conversation_id"] for m in messages} == {"tavus-c1"}
    events = [e for _i, e in client.events("ours")]
    assert not any(e["type"] == "replica.stopped_speaking" for e in events), "the replica said nothing more"
    cut = [e for e in events if e["type"] == "utterance.interrupted"]
    assert [e["utterance_id"] for e in cut] == [uid], "ended interrupted once"


# -- private rooms -----------------------------------------------------------------------------


def test_a_private_rooms_token_is_sealed_in_redis_and_never_logged(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = SecretStr(Fernet.generate_key().decode())
    c = echoq(secret_key=key)
    shown = c.open("priv", f"https://tavus.daily.co/c777?t={TOKEN}")
    assert shown["url"] == "https://tavus.daily.co/c777" and shown["private"] is True
    assert sealing.TOKEN_FIELD not in shown and sealing.TOKEN_FIELD not in c.conversation("priv")
    values = every_value(redis_client)
    assert values and not any(TOKEN.encode() in v for v in values), "the token is in Redis in plain text"
    sealed = redis_client.hget(keys.conversation("priv"), sealing.TOKEN_FIELD)
    assert sealed is not None and sealing.unseal(sealed.decode(), key) == TOKEN  # what the worker joins with
    assert all(TOKEN not in r.getMessage() for r in caplog.records)

    # a token given on its own is kept the same way; reopening without one forgets it
    c.open("priv2", "https://tavus.daily.co/c778", meeting_token=TOKEN)
    assert redis_client.hexists(keys.conversation("priv2"), sealing.TOKEN_FIELD)
    c.close("priv2")
    c.open("priv2", "https://tavus.daily.co/c778")
    assert not redis_client.hexists(keys.conversation("priv2"), sealing.TOKEN_FIELD)


def test_a_token_without_a_secret_key_is_a_clear_error_and_nothing_is_written(redis_client: redis.Redis) -> None:
    with pytest.raises(ConfigError, match="ECHOQ_SECRET_KEY") as info:
        echoq().open("priv", "https://tavus.daily.co/c777", meeting_token=TOKEN)
    assert TOKEN not in str(info.value)
    assert redis_client.exists(keys.conversation("priv")) == 0


# -- reopen and close --------------------------------------------------------------------------


def test_reopening_an_open_conversation_on_another_room_is_refused(redis_client: redis.Redis) -> None:
    c = echoq()
    c.open("re", "loopback://room-a")
    c.open("re", "loopback://room-a")  # the same room again is fine
    with pytest.raises(InvalidInput, match="close it before"):
        c.open("re", "loopback://room-b")
    assert c.conversation("re")["url"] == "loopback://room-a"
    c.close("re")  # no worker holds it and nothing is queued: closed at once
    assert c.conversation("re")["state"] == "closed"
    assert c.open("re", "loopback://room-b")["url"] == "loopback://room-b"


def test_a_conversation_whose_room_never_joins_can_be_closed(
    workers: Workers, client: Any, redis_client: redis.Redis
) -> None:
    workers.start(1)
    client.open("never", "loopback://room-never?join_fail=1&join_delay=1")
    wait_for(lambda: any(e["type"] == "conversation.join_failed" for _i, e in client.events("never")), 20,
             what="a failed join")
    # close while the worker holds the conversation for its next (failing) join
    wait_for(lambda: redis_client.exists(keys.lease("never")), 20, what="the next join attempt", interval=0.01)
    client.close("never")
    wait_for(lambda: client.conversation("never")["state"] == "closed", 20, what="the conversation to close")
    # closed means no more joins: let the worker's supervisor scan three more times
    marker = client.events("never")[-1][0]
    beats: set[float] = set()

    def scans() -> bool:
        beats.add(heartbeat(redis_client, workers.started[0].name))
        return len(beats) > 3

    wait_for(scans, 20, what="three supervisor scans")
    assert client.conversation("never")["state"] == "closed"
    assert [e["type"] for _i, e in client.events("never", marker)] == []


def heartbeat(r: redis.Redis, worker: str) -> float:
    """When the worker's supervisor last reported in (it does at every scan)."""
    raw = r.hget(keys.WORKERS, worker)
    return float(json.loads(raw)["ts"]) if raw else 0.0
