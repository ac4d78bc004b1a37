"""The Redis store (log, cursor, leases, interrupts) and the loopback transport, in process."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis

from tests.integration.conftest import wait_for, wire
from worker import audio, echo, keys
from worker.errors import (
    InvalidInput,
    MessageTooLarge,
    RateLimited,
    ReplicaAbsent,
    RoomDisconnected,
    SendFailed,
)
from worker.sender import BLOB_HEAD_BYTES, BLOB_PART_BYTES, Sender
from worker.settings import Settings
from worker.store import Store
from worker.transports.loopback import LoopbackTransport

pytestmark = pytest.mark.redis


def _entry(uid: str, inf: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    return ({"utterance_id": uid, "kind": "text", "text": "hi", "inference_id": inf or uid},
            {"id": uid, "kind": "text", "inference_id": inf or uid})


def _moves_lose_replies(store: Store, every: int) -> list[int]:
    """Redis runs each of ``store``'s cursor moves, but the answer to every ``every``-th call
    that makes them (one move, or a pipelined batch) never comes back, as when the connection
    drops after the request went out. Returns the running count of such calls."""
    calls = [0]

    def lost_now() -> bool:
        calls[0] += 1
        return calls[0] % every == 0

    real_script = store._advance

    class Advance:
        sha = real_script.sha

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            reply = real_script(*args, **kwargs)  # Redis ran it ...
            if lost_now():
                raise redis.TimeoutError("Timeout reading from socket")  # ... but the answer never came
            return reply

    real_pipeline = store.r.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute

        def execute(*eargs: Any, **ekwargs: Any) -> Any:
            moves = any(cmd[0][:2] == ("EVALSHA", real_script.sha) for cmd in pipe.command_stack)
            reply = real_execute(*eargs, **ekwargs)
            if moves and lost_now():
                raise redis.TimeoutError("Timeout reading from socket")
            return reply

        pipe.execute = execute
        return pipe

    store._advance = Advance()  # type: ignore[assignment]
    store.r.pipeline = pipeline  # type: ignore[method-assign]
    return calls


def _reply_lost(call: Callable[[], Any], store: Store) -> None:
    """``call()`` (cursor moves of ``store``) runs in Redis, and its answer is lost."""
    real_script, real_pipeline = store._advance, store.r.pipeline
    _moves_lose_replies(store, 1)
    try:
        with pytest.raises(redis.TimeoutError):
            call()
    finally:
        store._advance = real_script
        store.r.pipeline = real_pipeline  # type: ignore[method-assign]


def _held_room(redis_client: redis.Redis, name: str, *uids: str) -> tuple[Store, LoopbackTransport]:
    """Conversation "c" in loopback room ``name`` (no replica), with ``uids`` queued and its lease
    held by "me"."""
    store = Store(redis_client)
    store.open_conversation("c", f"loopback://{name}")
    for uid in uids:
        store.enqueue("c", *_entry(uid))
    assert store.take_lease("c", "me", 5)
    room = LoopbackTransport(f"loopback://{name}?replica=0", redis_client=redis_client)
    room.join(1)
    return store, room


def test_enqueue_assigns_increasing_seqs_and_is_idempotent_on_the_utterance_id(redis_client: redis.Redis) -> None:
    store = Store(redis_client)
    store.open_conversation("c", "loopback://r")
    assert store.enqueue("c", *_entry("u1")) == (1, True)
    assert store.enqueue("c", *_entry("u2")) == (2, True)
    assert store.enqueue("c", *_entry("u1")) == (1, False)  # a second firing adds nothing
    assert store.log_length("c") == 2
    assert [e["seq"] for e in store.entries_after("c", 0)] == [1, 2]
    assert store.utterance("u2")["state"] == "queued"


def test_enqueue_refuses_closed_conversations_and_reused_inference_ids(redis_client: redis.Redis) -> None:
    store = Store(redis_client)
    assert store.enqueue("ghost", *_entry("u0"))[0] == -1
    store.open_conversation("c", "loopback://r")
    store.enqueue("c", *_entry("u1", "inf"))
    assert store.enqueue("c", *_entry("u2", "inf"))[0] == -2
    store.close_conversation("c")
    assert store.enqueue("c", *_entry("u3"))[0] == -1
    assert store.log_length("c") == 1


def test_cursor_moves_only_for_the_lease_holder(redis_client: redis.Redis) -> None:
    store = Store(redis_client)
    store.open_conversation("c", "loopback://r")
    assert store.take_lease("c", "me", 5)
    assert not store.take_lease("c", "you", 5)
    assert store.advance("c", "me", 0, 3) == 0
    assert store.advance("c", "you", 9, 0) is None
    assert (store.cursor("c").seq, store.cursor("c").chunk) == (0, 3)
    assert not store.renew_lease("c", "you", 5) and store.renew_lease("c", "me", 5)
    assert not store.release_lease("c", "you") and store.release_lease("c", "me")
    assert store.lease_owner("c") is None


def test_a_lapsed_lease_comes_back_to_its_holder_only_if_nobody_took_it_since(redis_client: redis.Redis) -> None:
    store = Store(redis_client)
    store.open_conversation("c", "loopback://r")
    epoch = store.take_lease("c", "me", 5)
    assert epoch >= 1
    redis_client.delete(keys.lease("c"))  # ran out while Redis was away
    assert store.renew_lease("c", "me", 5, epoch) and store.lease_owner("c") == "me"
    assert redis_client.pttl(keys.lease("c")) > 0
    redis_client.delete(keys.lease("c"))
    assert store.advance("c", "me", 0, 2, epoch=epoch, ttl_s=5) == 0  # a cursor move takes it back too
    assert store.lease_owner("c") == "me"
    redis_client.delete(keys.lease("c"))
    assert store.advance("c", "me", 0, 3) is None  # without the epoch: no
    other = store.take_lease("c", "you", 5)  # someone else took it in between
    assert other == epoch + 1
    redis_client.delete(keys.lease("c"))
    assert not store.renew_lease("c", "me", 5, epoch)
    assert store.advance("c", "me", 0, 4, epoch=epoch, ttl_s=5) is None
    assert store.cursor("c").chunk == 2
    assert store.renew_lease("c", "you", 5, other)
    assert store.release_lease("c", "you")  # a release moves the epoch on: no taking back after it
    assert not store.renew_lease("c", "you", 5, other) and store.lease_owner("c") is None


def test_interrupt_cancels_queued_entries_only_and_bumps_the_generation(redis_client: redis.Redis) -> None:
    store = Store(redis_client)
    store.open_conversation("c", "loopback://r")
    for i in range(5):
        store.enqueue("c", *_entry(f"u{i}"))
    store.take_lease("c", "me", 5)
    store.advance("c", "me", 1, 0)  # u0 is done
    store.start_utterance("u1")  # u1 is being sent
    assert store.interrupt("c") == (1, 3)
    assert [store.utterance(f"u{i}")["state"] for i in range(5)] == ["queued", "sending", "cancelled", "cancelled", "cancelled"]
    assert store.interrupt_state("c") == (1, 5)
    assert store.start_utterance("u3") == 0  # a cancelled utterance is never claimed


def test_loopback_sends_exactly_the_app_message_as_json(redis_client: redis.Redis) -> None:
    t = LoopbackTransport("loopback://room?replica=0", redis_client=redis_client)
    with pytest.raises(RoomDisconnected):
        t.send(echo.interrupt("c"))  # before join
    t.join(1)
    msg = echo.text_echo("c", "Hello there!", "i", max_bytes=4096)
    t.send(msg)
    assert wire(redis_client, "room") == [msg]
    raw = redis_client.xrange(keys.loopback_room("room"))[0][1][b"data"]
    assert raw == echo.encode(msg)
    assert redis_client.sismember(keys.LOOPBACK_ROOMS, "room")
    t.leave()


def test_a_loopback_send_retried_after_its_reply_was_lost_is_in_the_room_once(redis_client: redis.Redis) -> None:
    room = LoopbackTransport("loopback://once?replica=0", redis_client=redis_client)
    room.join(1)
    real = room._append
    lost = [True]

    def append_then_lose_the_reply(**kwargs: Any) -> Any:
        real(**kwargs)  # Redis ran it ...
        if lost.pop() if lost else False:
            raise redis.TimeoutError("Timeout reading from socket")  # ... but the answer never came
        return 1

    room._append = append_then_lose_the_reply  # type: ignore[assignment]
    first, second = echo.interrupt("c"), echo.interrupt("c")
    with pytest.raises(SendFailed):
        room.send(first)
    room.send(first)  # the sender's retry of the same message
    room.send(second)  # a new message, equal in content: it goes in
    assert len(wire(redis_client, "once")) == 2


def test_loopback_faults(redis_client: redis.Redis) -> None:
    msg = echo.interrupt("c")
    failing = LoopbackTransport("loopback://f?fail_rate=1&replica=0", redis_client=redis_client)
    failing.join(1)
    with pytest.raises(SendFailed):
        failing.send(msg)
    assert wire(redis_client, "f") == []

    dropping = LoopbackTransport("loopback://d?disconnect_after=2&replica=0", redis_client=redis_client)
    dropping.join(1)
    dropping.send(msg)
    dropping.send(msg)
    with pytest.raises(RoomDisconnected):
        dropping.send(msg)
    assert not dropping.connected
    dropping.rejoin(1)
    dropping.send(msg)
    assert len(wire(redis_client, "d")) == 3

    small = LoopbackTransport("loopback://s?max_bytes=50&replica=0", redis_client=redis_client)
    small.join(1)
    with pytest.raises(MessageTooLarge):
        small.send(echo.text_echo("c", "x" * 100, "i", max_bytes=4096))

    limited = LoopbackTransport("loopback://l?max_rate=2&replica=0", redis_client=redis_client)
    limited.join(1)
    limited.send(msg)
    limited.send(msg)
    with pytest.raises(RateLimited):
        limited.send(msg)

    with pytest.raises(InvalidInput, match="unknown loopback option"):
        LoopbackTransport("loopback://x?bogus=1", redis_client=redis_client)


def test_loopback_waits_for_the_simulator_and_delivers_room_events(redis_client: redis.Redis) -> None:
    got: list[dict[str, Any]] = []
    t = LoopbackTransport("loopback://ev", redis_client=redis_client, on_event=got.append)
    t.join(1)
    with pytest.raises(ReplicaAbsent):
        t.wait_for_replica(0.2)
    redis_client.set(keys.SIMULATOR_ALIVE, "1", px=2000)
    t.wait_for_replica(1)
    event = {"event_type": "conversation.replica.started_speaking", "inference_id": "i"}
    redis_client.xadd(keys.loopback_events("ev"), {"data": json.dumps(event)})
    wait_for(lambda: got, 5, what="the room event")
    assert got == [event]
    assert threading.current_thread() is threading.main_thread()
    t.leave()


def test_a_replica_that_finishes_before_the_sender_records_still_leaves_the_utterance_spoken(
    redis_client: redis.Redis,
) -> None:
    store = Store(redis_client)
    store.open_conversation("c", "loopback://r")
    for uid in ("fast", "slow", "cut"):
        store.enqueue("c", *_entry(uid))
        store.start_utterance(uid)
    # the replica's "stopped speaking" comes first: the state waits for the sender
    assert store.mark_spoken("fast", "spoken", 0.8) == "sending"
    assert store.mark_sent("fast", 1) == "spoken"
    # the usual order
    assert store.mark_sent("slow", 3) == "sent"
    assert store.mark_spoken("slow", "spoken", 1.2) == "spoken"
    assert store.mark_sent("cut", 2) == "sent"
    assert store.mark_spoken("cut", "interrupted", 0.3) == "interrupted"
    assert [store.utterance(u)["state"] for u in ("fast", "slow", "cut")] == ["spoken", "spoken", "interrupted"]
    assert store.utterance("slow")["duration"] == "1.2"


def test_a_send_folded_into_its_cursor_move_goes_in_once_only_for_the_holder_and_not_after_an_interrupt(
        redis_client: redis.Redis) -> None:
    store, room = _held_room(redis_client, "fold", "u1")
    assert room.room_in(redis_client)
    first, second = echo.interrupt("c"), echo.interrupt("c")

    append = room.prepare_append(first)
    _reply_lost(lambda: store.move("c", "me", 0, 1, utterance_id="u1", chunks_sent=1, append=append, refuse_above=0),
                store)
    assert wire(redis_client, "fold") == [first]
    moved = store.move("c", "me", 0, 1, utterance_id="u1", chunks_sent=1, append=append, refuse_above=0)  # the retry
    assert (moved.held, moved.done) == (True, True)
    assert wire(redis_client, "fold") == [first]
    assert (store.cursor("c").seq, store.cursor("c").chunk) == (0, 1)
    assert store.utterance("u1")["chunks_sent"] == "1"

    other = room.prepare_append(second)
    assert not store.move("c", "you", 0, 2, append=other).held  # not the holder: nothing written, nothing moved
    store.interrupt("c")
    refused = store.move("c", "me", 0, 2, append=other, refuse_above=0)
    assert (refused.held, refused.done, refused.gen) == (True, False, 1)  # an interrupt came first
    assert wire(redis_client, "fold") == [first]
    assert store.cursor("c").chunk == 1
    assert store.move("c", "me", 0, 2, append=other, refuse_above=1).done
    assert wire(redis_client, "fold") == [first, second]


def test_moves_of_many_conversations_in_one_call_each_answer_for_itself_even_after_redis_forgot_the_script(
        redis_client: redis.Redis) -> None:
    from worker.store import MoveCall

    store = Store(redis_client)
    rooms = {}
    for cid in ("m1", "m2", "m3"):
        store.open_conversation(cid, f"loopback://many-{cid}")
        store.enqueue(cid, *_entry(f"u-{cid}"))
        assert store.take_lease(cid, "me", 5)
        rooms[cid] = LoopbackTransport(f"loopback://many-{cid}?replica=0", redis_client=redis_client)
        rooms[cid].join(1)
    store.interrupt("m3")
    messages = {cid: echo.interrupt(cid) for cid in rooms}
    calls = [MoveCall("m1", "me", 0, 1, utterance_id="u-m1", chunks_sent=1, append=rooms["m1"].prepare_append(messages["m1"]),
                      refuse_above=0),
             MoveCall("m2", "not-me", 0, 1, append=rooms["m2"].prepare_append(messages["m2"]), refuse_above=0),
             MoveCall("m3", "me", 0, 1, append=rooms["m3"].prepare_append(messages["m3"]), refuse_above=0)]
    redis_client.script_flush()  # as after a Redis restart: the first try finds no script
    moved = store.move_many(calls)
    assert [(m.held, m.done) for m in moved] == [(True, True), (False, False), (True, False)]
    assert moved[2].gen == 1  # refused: an interrupt came first
    assert [wire(redis_client, f"many-{cid}") for cid in rooms] == [[messages["m1"]], [], []]
    assert store.utterance("u-m1")["chunks_sent"] == "1"
    # a retry after a lost reply writes nothing twice
    again = [MoveCall("m1", "me", 0, 2, utterance_id="u-m1", chunks_sent=2, refuse_above=0,
                      append=rooms["m1"].prepare_append(echo.interrupt("again"))),
             MoveCall("m2", "not-me", 0, 2, append=rooms["m2"].prepare_append(echo.interrupt("again")))]
    _reply_lost(lambda: store.move_many(again), store)
    assert wire(redis_client, "many-m1") == [messages["m1"], echo.interrupt("again")]
    assert [(m.held, m.done) for m in store.move_many(again)] == [(True, True), (False, False)]
    assert wire(redis_client, "many-m1") == [messages["m1"], echo.interrupt("again")]
    assert wire(redis_client, "many-m2") == []
    assert store.utterance("u-m1")["chunks_sent"] == "2"


@pytest.mark.parametrize("pacing", ["realtime", "burst"])
def test_a_sender_whose_folded_move_lost_its_reply_puts_every_chunk_in_the_room_once_in_order(
        redis_client: redis.Redis, pacing: str) -> None:
    """Real-time pacing moves the cursor a chunk at a time; burst pacing up to 8 chunks in one
    round trip (each chunk's write atomic with its own move). Every third (burst: second) reply
    is lost."""
    store = Store(redis_client)
    store.open_conversation("c", "loopback://lost")
    pcm = (bytes(range(256)) * 100)[:13 * 1920]  # 13 chunks of 40 ms of 24 kHz s16le
    entry = {"utterance_id": "a1", "kind": "audio", "inference_id": "a1", "sample_rate": 24000, "format": "s16le",
             "source_rate": 24000, "channels": 1}
    store.enqueue("c", entry, {"id": "a1", "kind": "audio", "inference_id": "a1"}, blob=pcm)
    store.enqueue("c", *_entry("t1"))
    assert store.take_lease("c", "me", 5)
    room = LoopbackTransport("loopback://lost?replica=0", redis_client=redis_client)
    room.join(1)
    settings = Settings(pacing=pacing, pacing_loop=False, chunk_ms=40)
    sender = Sender("c", store=store, transport=room, settings=settings, token="me", wake=threading.Event(),
                    stopping=lambda: False)
    assert sender.folds
    calls = _moves_lose_replies(store, 3 if pacing == "realtime" else 2)
    assert sender.drain() == 2
    messages = wire(redis_client, "lost")
    audio_msgs = [m for m in messages if m["properties"].get("inference_id") == "a1"]
    assert len(audio_msgs) == 13 and [m["properties"]["done"] for m in audio_msgs] == [False] * 12 + [True]
    joined = b"".join(base64.b64decode(m["properties"]["audio"]) for m in audio_msgs)
    assert joined == pcm  # every chunk once, in order
    assert [m["properties"]["inference_id"] for m in messages] == ["a1"] * 13 + ["t1"]
    # one call a chunk (and every third one again), or batches of 8 + 5 (the second one again);
    # the text goes on its own way (one script a run of texts)
    assert calls[0] >= 14 if pacing == "realtime" else calls[0] == 3
    assert store.cursor("c").seq == 2
    assert store.utterance("a1")["state"] == "sent" and store.utterance("t1")["state"] == "sent"


def test_many_leases_are_renewed_in_one_call_each_only_for_its_holder(redis_client: redis.Redis) -> None:
    store = Store(redis_client)
    for cid in ("a", "b", "c"):
        store.open_conversation(cid, f"loopback://{cid}")
    assert store.take_lease("a", "me", 5)
    assert store.take_lease("b", "you", 5)
    epoch = store.take_lease("c", "me", 5)
    redis_client.delete(keys.lease("c"))  # ran out while nobody took it: the epoch takes it back
    assert store.renew_leases([("a", "me", None), ("b", "me", None), ("c", "me", epoch)], 7) == [True, False, True]
    assert [store.lease_owner(c) for c in ("a", "b", "c")] == ["me", "you", "me"]
    assert 5000 < redis_client.pttl(keys.lease("a")) <= 7000


def test_an_owner_dying_between_an_utterances_last_message_and_its_record_leaves_it_recorded_by_the_next(
        redis_client: redis.Redis) -> None:
    """The last message and the cursor move are one round trip, the record the next: the next
    owner records what the cursor has passed, with the exact count, and sends nothing twice."""
    store = Store(redis_client)
    store.open_conversation("c", "loopback://orphan")
    pcm = (bytes(range(256)) * 100)[:13 * 1920]  # 13 chunks
    entry = {"utterance_id": "a1", "kind": "audio", "inference_id": "a1", "sample_rate": 24000, "format": "s16le",
             "source_rate": 24000, "channels": 1}
    store.enqueue("c", entry, {"id": "a1", "kind": "audio", "inference_id": "a1"}, blob=pcm)
    store.enqueue("c", *_entry("t1"))
    room = LoopbackTransport("loopback://orphan?replica=0", redis_client=redis_client)
    room.join(1)

    class Died(Exception):
        pass

    def dies(*_args: Any, **_kwargs: Any) -> str:
        raise Died()

    assert store.take_lease("c", "first", 5)
    first = Sender("c", store=store, transport=room, settings=Settings(), token="first", wake=threading.Event(),
                   stopping=lambda: False)
    first.store = Store(redis_client)
    first.store.mark_sent = dies  # type: ignore[method-assign]
    with pytest.raises(Died):
        first.drain()
    assert store.utterance("a1")["state"] == "sending" and store.cursor("c").seq == 1  # in the room, not recorded
    store.release_lease("c", "first")

    assert store.take_lease("c", "second", 5)
    second = Sender("c", store=store, transport=room, settings=Settings(), token="second", wake=threading.Event(),
                    stopping=lambda: False)
    assert second.drain() == 1  # t1
    a1 = store.utterance("a1")
    assert (a1["state"], a1["chunks_total"]) == ("sent", "13")
    assert store.utterance("t1")["state"] == "sent"
    messages = wire(redis_client, "orphan")
    assert [m["properties"]["inference_id"] for m in messages] == ["a1"] * 13 + ["t1"]  # nothing twice
    sent_events = [e for _id, e in store.events("c") if e["type"] == "utterance.sent"]
    assert [e["utterance_id"] for e in sent_events] == ["a1", "t1"]


def test_a_run_of_texts_goes_in_one_call_only_for_the_holder_and_not_after_an_interrupt(
        redis_client: redis.Redis) -> None:
    from worker.store import TextSend

    store, room = _held_room(redis_client, "texts", "t1", "t2", "t3")
    store.update_utterance("t2", state="cancelled")  # cancelled while it waited: passed over
    messages = {uid: echo.text_echo("c", f"line {uid}", uid, max_bytes=10_000) for uid in ("t1", "t2", "t3")}

    def items(*uids: str) -> list[TextSend]:
        return [TextSend(int(uid[1]), uid, room.prepare_append(messages[uid]), {"type": "utterance.sending"},
                         {"type": "utterance.sent"}) for uid in uids]

    run = items("t1", "t2", "t3")
    assert not store.send_texts("c", "you", run, refuse_above=0, ttl_s=5).held  # not the holder
    assert wire(redis_client, "texts") == [] and store.cursor("c").seq == 0
    real = store._send_texts

    def reply_lost(**kwargs: Any) -> Any:
        real(**kwargs)  # Redis ran it, and the answer never came
        raise redis.TimeoutError("Timeout reading from socket")

    store._send_texts = reply_lost  # type: ignore[assignment]
    with pytest.raises(redis.TimeoutError):
        store.send_texts("c", "me", run, refuse_above=0, ttl_s=5)
    store._send_texts = real
    assert [m["properties"]["inference_id"] for m in wire(redis_client, "texts")] == ["t1", "t3"]
    again = store.send_texts("c", "me", run, refuse_above=0, ttl_s=5)  # the retry
    assert (again.held, again.done, again.states) == (True, True, ["sent", None, "sent"])
    assert wire(redis_client, "texts") == [messages["t1"], messages["t3"]]  # once each, in order
    assert store.cursor("c").seq == 3 and store.cursor("c").chunk == 0
    assert [store.utterance(u)["state"] for u in ("t1", "t2", "t3")] == ["sent", "cancelled", "sent"]
    assert store.utterance("t3")["chunks_sent"] == "1" and store.utterance("t3")["started_at"]
    types = [e["type"] for _id, e in store.events("c")]
    assert types == ["utterance.sending", "utterance.sent"] * 2

    store.enqueue("c", *_entry("t4"))
    messages["t4"] = echo.text_echo("c", "line t4", "t4", max_bytes=10_000)
    gen, _cancelled = store.interrupt("c")
    store.update_utterance("t4", state="queued")  # as if enqueued after the interrupt
    later = items("t4")
    refused = store.send_texts("c", "me", later, refuse_above=gen - 1, ttl_s=5)
    assert (refused.held, refused.done, refused.gen) == (True, False, gen)  # the interrupt goes first
    assert len(wire(redis_client, "texts")) == 2 and store.cursor("c").seq == 3
    assert store.send_texts("c", "me", later, refuse_above=gen, ttl_s=5).states == ["sent"]
    assert wire(redis_client, "texts")[-1] == messages["t4"]


def test_a_sender_puts_a_run_of_texts_in_one_call_each_once_in_order_even_when_replies_are_lost(
        redis_client: redis.Redis) -> None:
    """Back-to-back texts go in one round trip; a text too long for a message fails on its own
    between two runs; a lost reply is retried without a second copy in the room."""
    store = Store(redis_client)
    store.open_conversation("c", "loopback://runs")
    uids = [f"r{i}" for i in range(40)]
    for uid in uids:
        entry, record = _entry(uid)
        if uid == "r20":
            entry["text"] = "x" * 20_000  # over one message
        store.enqueue("c", entry, record)
    assert store.take_lease("c", "me", 5)
    room = LoopbackTransport("loopback://runs?replica=0", redis_client=redis_client)
    room.join(1)
    sender = Sender("c", store=store, transport=room, settings=Settings(), token="me", wake=threading.Event(),
                    stopping=lambda: False)
    real, calls = store._send_texts, [0]

    def every_second_reply_lost(**kwargs: Any) -> Any:
        reply = real(**kwargs)
        calls[0] += 1
        if calls[0] % 2 == 1:
            raise redis.TimeoutError("Timeout reading from socket")
        return reply

    store._send_texts = every_second_reply_lost  # type: ignore[assignment]
    assert sender.drain() == 40
    on_wire = [m["properties"]["inference_id"] for m in wire(redis_client, "runs")]
    assert on_wire == [u for u in uids if u != "r20"]
    # 39 texts in runs of at most 16 around the long one: 16 + 4, then 16 + 3, each call made twice
    assert calls[0] == 8
    assert store.utterance("r20")["state"] == "failed" and "too long" in store.utterance("r20")["error"]
    assert all(store.utterance(u)["state"] == "sent" for u in uids if u != "r20")
    assert store.cursor("c").seq == 40


def test_a_retried_chunk_already_in_the_room_never_moves_the_cursor_back(redis_client: redis.Redis) -> None:
    """A batch of chunks retried whole after a lost reply, cut again part-way: the chunks found in
    the room leave the cursor where the later ones put it, so a next owner repeats nothing."""
    from worker.store import MoveCall

    store, room = _held_room(redis_client, "back", "u1")
    messages = [echo.interrupt(f"m{i}") for i in range(3)]
    calls = [MoveCall("c", "me", 0, i + 1, append=room.prepare_append(m), refuse_above=0)
             for i, m in enumerate(messages)]
    _reply_lost(lambda: store.move_many(calls), store)
    assert store.cursor("c").chunk == 3
    assert store.move_many(calls[:1])[0].done  # the retry got as far as the first one
    assert store.cursor("c").chunk == 3 and wire(redis_client, "back") == messages


# an audio blob read in parts ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_mp3(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """About 3 MB of MP3 (80 s of noise at 320 kbit/s): several parts of the blob."""
    path = tmp_path_factory.mktemp("blob") / "long.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "anoisesrc=d=80:c=pink:r=44100:a=0.3",
                    "-ac", "2", "-c:a", "libmp3lame", "-b:a", "320k", str(path)], check=True)
    data = path.read_bytes()
    assert 3 * 1024 * 1024 - 300_000 < len(data) < 4 * 1024 * 1024
    return data


def _audio_room(redis_client: redis.Redis, name: str, blob: bytes, **settings: Any) -> tuple[Store, Sender]:
    """Conversation "c" in loopback room ``name`` with audio utterance "a1" (``blob``) then text "t1"
    queued, and a sender holding its lease."""
    store = Store(redis_client)
    store.open_conversation("c", f"loopback://{name}")
    entry = {"utterance_id": "a1", "kind": "audio", "inference_id": "a1", "sample_rate": 24000, "format": "mp3"}
    store.enqueue("c", entry, {"id": "a1", "kind": "audio", "inference_id": "a1"}, blob=blob)
    store.enqueue("c", *_entry("t1"))
    assert store.take_lease("c", "me", 5)
    room = LoopbackTransport(f"loopback://{name}?replica=0", redis_client=redis_client)
    room.join(1)
    sender = Sender("c", store=store, transport=room, settings=Settings(pacing_loop=False, **settings), token="me",
                    wake=threading.Event(), stopping=lambda: False)
    return store, sender


def _ranges(store: Store, monkeypatch: pytest.MonkeyPatch,
            then: Callable[[int], None] | None = None) -> list[tuple[int, int]]:
    """Every (start, end) the worker reads of a blob; ``then(n)`` runs after the n-th part is read."""
    reads: list[tuple[int, int]] = []
    start_real, range_real = store.blob_start, store.blob_range

    def blob_start(uid: str, length: int) -> tuple[int | None, bytes]:
        reads.append((0, length))
        return start_real(uid, length)

    def blob_range(uid: str, start: int, end: int) -> bytes:
        reads.append((start, end))
        part = range_real(uid, start, end)
        if then is not None:
            then(len(reads) - 1)
        return part

    def no_get(uid: str) -> bytes | None:
        raise AssertionError("the whole blob was read at once")

    monkeypatch.setattr(store, "blob_start", blob_start)
    monkeypatch.setattr(store, "blob_range", blob_range)
    monkeypatch.setattr(store, "blob", no_get)
    return reads


def test_a_long_audio_blob_is_read_in_parts_and_decodes_as_the_whole_blob_does(
        redis_client: redis.Redis, long_mp3: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    store, sender = _audio_room(redis_client, "parts", long_mp3)
    entry = store.entries_after("c", 0, count=1)[0]
    reads = _ranges(store, monkeypatch)
    pcm = b"".join(sender._pcm_chunks(entry))
    settings = Settings()
    whole = audio.convert(long_mp3, target_rate=24000, max_bytes=settings.max_audio_bytes,
                          max_seconds=settings.max_audio_seconds)
    assert pcm == whole
    assert reads[0] == (0, BLOB_HEAD_BYTES) and len(reads) >= 4  # the head, then parts of 1 MB
    assert [start for start, _ in reads[1:]] == [end for _, end in reads[:-1]]  # in order, each once
    assert reads[-1][1] == len(long_mp3)
    assert max(end - start for start, end in reads) <= BLOB_PART_BYTES


def test_an_audio_blob_deleted_while_it_is_read_fails_its_utterance_with_the_reason(
        redis_client: redis.Redis, long_mp3: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    store, sender = _audio_room(redis_client, "gone", long_mp3, pacing="burst")

    def deleted_after_the_first_part(n: int) -> None:
        if n == 1:
            redis_client.delete(keys.blob("a1"))

    reads = _ranges(store, monkeypatch, deleted_after_the_first_part)
    assert sender.drain() == 2  # the utterance failed; the text after it went on
    a1 = store.utterance("a1")
    got = BLOB_HEAD_BYTES + BLOB_PART_BYTES
    assert a1["state"] == "failed"
    assert a1["error"].startswith(f"the audio blob went away while it was read: {got} of {len(long_mp3)} bytes")
    assert len(reads) == 3  # the head, the part read before it went, and the read that found it gone
    assert store.utterance("t1")["state"] == "sent"
    assert a1["error"].endswith("(cut mid-utterance: conversation.interrupt sent)")  # no done, ever
    sent = [m["properties"] for m in wire(redis_client, "gone") if m.get("properties", {}).get("inference_id") == "a1"]
    assert not any(p["done"] for p in sent)


def test_a_redis_error_while_a_blob_is_read_fails_the_drain_not_the_utterance(
        redis_client: redis.Redis, long_mp3: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a failed GET of the whole blob did: the drain is tried again and sends it all."""
    store, sender = _audio_room(redis_client, "flaky", long_mp3, pacing="burst")

    def connection_lost(n: int) -> None:
        if n == 2:
            raise redis.ConnectionError("Connection reset by peer")

    _ranges(store, monkeypatch, connection_lost)
    with pytest.raises(redis.ConnectionError):
        sender.drain()
    assert store.utterance("a1")["state"] == "sending"
    monkeypatch.undo()
    assert sender.drain() == 2
    assert store.utterance("a1")["state"] == "sent" and store.utterance("t1")["state"] == "sent"
    messages = [m for m in wire(redis_client, "flaky") if m["properties"].get("inference_id") == "a1"]
    sent = b"".join(base64.b64decode(m["properties"]["audio"]) for m in messages)
    settings = Settings()
    whole = audio.convert(long_mp3, target_rate=24000, max_bytes=settings.max_audio_bytes,
                          max_seconds=settings.max_audio_seconds)
    assert sent[:len(whole)] == whole and messages[-1]["properties"]["done"]  # every chunk once, in order


def test_an_interrupt_cuts_what_still_plays_past_the_cancelled_ones_in_one_look(redis_client: redis.Redis) -> None:
    """Behind an interrupt there are often many cancelled utterances (the last interrupt's): their
    states are read in one round trip, and only utterances still playing are cut, newest first,
    back to the one the replica finished."""
    uids = ["s1", "s2", "c3", "s4", *[f"x{i}" for i in range(20)]]
    store, room = _held_room(redis_client, "cut", *uids)
    for uid, state in [("s1", "spoken"), ("s2", "sent"), ("c3", "failed"), ("s4", "sent")]:
        store.update_utterance(uid, state=state)
    for i in range(20):
        store.update_utterance(f"x{i}", state="cancelled")
    assert store.move("c", "me", len(uids), 0, ttl_s=5).held  # everything sent or passed over
    store.interrupt("c")
    sender = Sender("c", store=store, transport=room, settings=Settings(), token="me", wake=threading.Event(),
                    stopping=lambda: False)
    real, cuts = store.cut_playing, []

    def counted(uid: str) -> bool:
        cuts.append(uid)
        return real(uid)

    store.cut_playing = counted  # type: ignore[method-assign]
    sender.drain()
    assert cuts == ["s4", "s2"]  # no call for the cancelled or failed ones, none past the spoken one
    assert [store.utterance(u)["state"] for u in ("s1", "s2", "c3", "s4")] == ["spoken", "interrupted", "failed",
                                                                                "interrupted"]
    assert [m["event_type"] for m in wire(redis_client, "cut")] == ["conversation.interrupt"]
