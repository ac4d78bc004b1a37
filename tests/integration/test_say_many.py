"""Batched text enqueue: order, ids, idempotency, all-or-none refusal, and delivery by a worker."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from tests.integration.conftest import Workers, wait_for, wire
from worker.errors import InvalidInput, TextTooLong, UnknownConversation

pytestmark = pytest.mark.redis


def test_a_batch_is_delivered_in_order_with_its_ids_and_nothing_lost(
        client: Any, workers: Workers, redis_client: redis.Redis) -> None:
    workers.start(1)
    client.open("many", "loopback://many-room?replica=0")
    first = client.say("many", "before the batch")
    texts = [f"line {i}" for i in range(300)]
    ids = client.say_many("many", texts, utterance_ids=[f"u{i}" for i in range(300)])
    assert ids == [f"u{i}" for i in range(300)]
    last = client.say("many", "after the batch")
    assert client.wait(last, timeout=60)["state"] in ("sent", "spoken")
    assert [client.status(uid)["seq"] for uid in (first, "u0", "u299", last)] == [1, 2, 301, 302]
    got = wait_for(lambda: (w := wire(redis_client, "many-room")) and len(w) >= 302 and w, 30, what="302 messages")
    assert [m["properties"]["text"] for m in got] == ["before the batch", *texts, "after the batch"]
    assert [m["properties"]["inference_id"] for m in got[1:-1]] == ids  # the inference id defaults to the id


def test_a_batch_is_idempotent_on_its_utterance_ids(client: Any) -> None:
    client.open("again", "loopback://again-room?replica=0")
    client.say_many("again", ["a", "b"], utterance_ids=["a1", "b1"])
    assert client.say_many("again", ["a", "b", "c"], utterance_ids=["a1", "b1", "c1"]) == ["a1", "b1", "c1"]
    assert client.store.log_length("again") == 3
    assert [client.status(u)["seq"] for u in ("a1", "b1", "c1")] == [1, 2, 3]


@pytest.mark.parametrize(("bad", "uids", "infs", "error", "words"), [
    (["ok", "   ", "ok"], None, None, InvalidInput, "item 1 of the batch: text is empty"),
    (["ok", "x" * 100_000], None, None, TextTooLong, "item 1 of the batch"),
    (["ok", "ok", "ok"], ["a", "b", "a"], None, InvalidInput, "item 2 of the batch: utterance id 'a' is item 0's"),
    (["ok", "ok"], ["a", "b"], ["i", "i"], InvalidInput, "item 1 of the batch: inference_id 'i' is item 0's"),
    (["ok", "ok"], ["a", "bad id!"], None, InvalidInput, "item 1 of the batch: utterance id must be"),
    (["ok", "ok"], ["a"], None, InvalidInput, "2 texts need as many utterance ids"),
])
def test_a_bad_item_refuses_the_whole_batch_and_enqueues_nothing(
        client: Any, bad: list[str], uids: list[str] | None, infs: list[str] | None,
        error: type[Exception], words: str) -> None:
    client.open("strict", "loopback://strict-room?replica=0")
    with pytest.raises(error) as err:
        client.say_many("strict", bad, utterance_ids=uids, inference_ids=infs)
    assert words in str(err.value) and ("nothing was enqueued" in str(err.value) or "need as many" in words)
    assert client.store.log_length("strict") == 0


def test_an_inference_id_taken_in_redis_refuses_the_batch_naming_the_item(client: Any) -> None:
    client.open("taken", "loopback://taken-room?replica=0")
    client.say("taken", "first", utterance_id="x0", inference_id="shared")
    with pytest.raises(InvalidInput, match=r"item 2 of the batch: inference_id 'shared' is already used"):
        client.say_many("taken", ["a", "b", "c"], utterance_ids=["x1", "x2", "x3"], inference_ids=["i1", "i2", "shared"])
    assert client.store.log_length("taken") == 1
    assert client.store.utterance("x1") is None
    with pytest.raises(UnknownConversation):
        client.say_many("nobody", ["a"])


def test_a_script_run_enqueues_back_to_back_text_lines_as_one_batch_in_order(client: Any) -> None:
    from producer.scripting.runs import Runner
    from producer.scripting.script import parse_text

    client.open("scripted", "loopback://scripted-room?replica=0")
    calls: list[str] = []
    real_say, real_many = client.say, client.say_many
    client.say = lambda *a, **kw: calls.append("say") or real_say(*a, **kw)
    client.say_many = lambda *a, **kw: calls.append(f"say_many:{len(a[1])}") or real_many(*a, **kw)
    script = parse_text("conversation: scripted\nlines:\n  - text: one\n  - text: two\n  - text: three\n"
                        "    pause: 1h\n  - text: four\n", check_audio=False)
    run = Runner(client.redis, client=client).start(script, run_id="run:batch")
    assert calls == ["say_many:3"]  # the pause after line 3 holds line 4 back
    assert [ln.get("queued_at") is not None for ln in run["lines"]] == [True, True, True, False]
    entries = client.store.entries_after("scripted", 0)
    assert [(e["utterance_id"], e["text"]) for e in entries] == [("run:batch:1", "one"), ("run:batch:2", "two"),
                                                                 ("run:batch:3", "three")]
