"""Bounded Redis memory: every key a closed conversation leaves behind expires, and its queue empties."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import Workers, heard_everything, wait_for
from tests.integration.test_delivery import tone_wav
from worker import keys, retention
from worker.settings import Settings

pytestmark = pytest.mark.redis

RETENTION_S = 40


def keys_of(client: redis.Redis, names: list[str]) -> list[str]:
    """Every key in the test database whose name mentions one of ``names``."""
    return sorted({k.decode() for k in client.scan_iter(count=1000) if any(n in k.decode() for n in names)})


def assert_all_expire(client: redis.Redis, found: list[str], limit: int) -> None:
    ttls = {k: client.ttl(k) for k in found}
    lasting = {k: t for k, t in ttls.items() if t == -1 or t > limit}
    assert not lasting, f"keys that outlive the retention of {limit}s: {lasting}"


def test_after_close_every_key_of_the_conversation_expires_within_the_retention(
    workers: Workers, simulator: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    from producer.client import EchoqClient

    workers.start(1, ECHOQ_RETENTION_S=str(RETENTION_S))
    client = EchoqClient(settings=Settings(redis_url=TEST_REDIS_URL, retention_s=RETENTION_S))
    client.open("conv-r", "loopback://room-r")
    uids = [client.say("conv-r", f"line {n}") for n in range(3)]
    uids.append(client.play("conv-r", tone_wav(tmp_path / "tone.wav", 0.3)))
    for uid in uids:
        client.wait(uid, timeout=30, states=("sent", "spoken"))
    heard_everything(simulator, redis_client, "room-r")
    client.close("conv-r")
    wait_for(lambda: client.conversation("conv-r")["state"] == "closed", 30, what="the conversation to close")
    wait_for(lambda: "conversation.expiring" in workers.started[0].log(), 10, what="the worker to set the TTLs")

    def settled() -> list[str] | None:
        # a doorbell rung just after the first pass is the second pass's to delete (two lease
        # TTLs after the close): wait for it rather than read the keys between the two
        found = keys_of(redis_client, ["conv-r", "room-r", *uids])
        lasting = [k for k in found if redis_client.ttl(k) == -1]
        queued = [q for q in retention.queue_keys("conv-r") if redis_client.exists(q)]
        return None if lasting or queued else found

    found = wait_for(settled, 20, what="every key of the closed conversation to expire and its queue to empty")
    named = {*retention.conversation_keys("conv-r"), keys.loopback_room("room-r"),
             *(keys.utterance(u) for u in uids), *(keys.inference(u) for u in uids)}
    assert named <= set(found), f"missing from the scan: {named - set(found)}"
    assert_all_expire(redis_client, found, RETENTION_S)
    assert not any(redis_client.exists(q) for q in retention.queue_keys("conv-r"))
    # still readable until it expires
    assert client.status(uids[0])["state"] in ("sent", "spoken")

    # reopened, the conversation's own keys last again (its new utterances are appended to them)
    client.open("conv-r", "loopback://room-r")
    assert all(redis_client.ttl(k) == -1 for k in retention.conversation_keys("conv-r") if redis_client.exists(k))


def test_closing_a_conversation_nobody_owns_deletes_its_leftover_doorbells(redis_client: redis.Redis) -> None:
    from producer.client import EchoqClient

    client = EchoqClient(settings=Settings(redis_url=TEST_REDIS_URL, retention_s=RETENTION_S))
    client.open("conv-l", "loopback://room-l")  # no worker runs: nobody will take it
    client.interrupt("conv-l")
    client.interrupt("conv-l")
    queue = keys.conv_queue("conv-l")
    assert redis_client.llen(queue) == 2  # two doorbells wait for an owner that never comes
    client.close("conv-l")
    assert client.conversation("conv-l")["state"] == "closed"
    assert redis_client.llen(queue) == 0
    assert_all_expire(redis_client, keys_of(redis_client, ["conv-l", "room-l"]), RETENTION_S)


def test_a_doorbell_and_a_room_event_that_come_after_the_close_are_cleaned_up_too(
    workers: Workers, client: Any, redis_client: redis.Redis
) -> None:
    workers.start(1, ECHOQ_RETENTION_S=str(RETENTION_S))  # lease TTL 2 s: the second pass 4 s after the close
    # no replica and no simulator: nothing but this test writes into the room's event stream
    client.open("conv-z", "loopback://room-z?replica=0")
    client.wait(client.say("conv-z", "last words"), timeout=30, states=("sent", "spoken"))
    client.close("conv-z")
    wait_for(lambda: "conversation.expiring" in workers.started[0].log(), 30, what="the first pass")
    # a producer's doorbell racing the close, and a replica event written after it: both create
    # their keys anew, without a TTL
    redis_client.delete(keys.loopback_events("room-z"))
    client.app.send_task(keys.TASK_DRAIN, args=["conv-z"], queue=keys.conv_queue("conv-z"))
    redis_client.xadd(keys.loopback_events("room-z"), {"data": "{}"})
    wait_for(lambda: redis_client.llen(keys.conv_queue("conv-z")) == 0, 20, what="the late doorbell to go")
    ttl = wait_for(lambda: (t := redis_client.ttl(keys.loopback_events("room-z"))) > 0 and t, 20,
                   what="the late room event to expire")
    assert ttl <= RETENTION_S
