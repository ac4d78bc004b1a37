"""worker.transports.daily against the in-memory ``daily`` double (tests/doubles/fake_daily.py).

The double delivers every completion and event on its own SDK thread, like daily-python, so
these tests exercise the real hand-off between that thread and the caller's.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest

from tests.doubles.fake_daily import CHANNEL_NOT_OPEN, DoubleInit, FakeDaily, NotInitialised
from tests.unit.test_microphone import CID, MemoryStore
from tests.unit.test_microphone import TOKEN as LEASE
from worker.errors import InvalidInput, JoinFailed, ReplicaAbsent, RoomDisconnected, SendFailed
from worker.sender import Sender
from worker.settings import Settings
from worker.transports import daily_sdk
from worker.transports.daily import (
    CHANNEL_FAILURES_BEFORE_LOST,
    CLIENT_SETTINGS,
    REPLICA_JOINED,
    REPLICA_LEFT,
    DailyTransport,
    shutdown_all,
    wait_for_cleanup,
)

URL = "https://example.daily.co/room-1"
TOKEN = "eyJSECRET-TOKEN-1234"
MESSAGE = {"message_type": "conversation", "event_type": "conversation.echo", "conversation_id": "c1"}


@pytest.fixture
def fake() -> Iterator[FakeDaily]:
    sdk = FakeDaily()
    yield sdk
    sdk.finish_pending_joins()
    shutdown_all()
    assert wait_for_cleanup(10.0)
    assert sdk.violations == [], "a client method was called from inside an SDK callback"
    assert sdk.callback_errors == [], "an event handler raised on the SDK thread"
    sdk.close()


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"join_timeout_s": 5.0, "send_timeout_s": 5.0, "replica_wait_timeout_s": 5.0}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def transport(
    fake: FakeDaily, url: str = URL, events: list[dict[str, Any]] | None = None, *, replica: bool = True,
    **settings: Any,
) -> DailyTransport:
    """A transport, not joined; with ``replica`` the room has a replica in it (sends wait for one)."""
    if replica and not fake.room:
        fake.add_participant("tavus-replica")
    on_event = events.append if events is not None else None
    return DailyTransport(url, settings=make_settings(**settings), on_event=on_event, daily_module=fake)


def joined(fake: FakeDaily, **kwargs: Any) -> DailyTransport:
    t = transport(fake, **kwargs)
    t.join(5.0)
    return t


# -- join ---------------------------------------------------------------------------------------


def test_join_succeeds_with_no_camera_and_no_microphone(fake: FakeDaily) -> None:
    t = joined(fake)
    assert t.connected
    client = fake.clients[0]
    assert client.state == "joined"
    assert client.join_args["meeting_url"] == URL
    assert client.join_args["client_settings"] == CLIENT_SETTINGS
    assert CLIENT_SETTINGS["inputs"] == {"camera": False, "microphone": False}
    assert fake.init_calls == 1


def test_importing_and_constructing_never_initialises(fake: FakeDaily) -> None:
    transport(fake)
    assert fake.init_calls == 0


def test_token_in_url_goes_to_meeting_token_not_the_url(fake: FakeDaily) -> None:
    joined(fake, url=f"{URL}?t={TOKEN}")
    args = fake.clients[0].join_args
    assert args["meeting_token"] == TOKEN
    assert TOKEN not in args["meeting_url"]


def test_slow_failing_join_times_out_and_releases_the_client(fake: FakeDaily) -> None:
    # Like an offline join: the SDK reports its error only much later, and until then the
    # client's leave and release wait behind the pending join.
    fake.join_gate.clear()
    fake.join_error = "Join failed: network unreachable"
    t = transport(fake)
    with pytest.raises(JoinFailed, match="timed out"):
        t.join(0.2)
    assert not t.connected
    client = fake.clients[0]
    # join() returned while the SDK still held the join: it did not wait for the release.
    assert not client.released
    fake.join_gate.set()
    assert wait_for_cleanup(10.0)
    assert client.leave_calls == 1
    assert client.released
    assert client.state == "left"


def test_transport_joins_again_after_a_timed_out_join(fake: FakeDaily) -> None:
    fake.join_gate.clear()
    t = transport(fake)
    with pytest.raises(JoinFailed):
        t.join(0.1)
    fake.join_gate.set()
    t.join(5.0)
    t.send(MESSAGE)
    assert fake.sent == [MESSAGE]
    assert wait_for_cleanup(10.0)
    assert fake.clients[0].released and not fake.clients[1].released


def test_join_error_from_the_sdk_raises_join_failed_and_releases(fake: FakeDaily) -> None:
    fake.join_error = "Meeting not found"
    t = transport(fake)
    with pytest.raises(JoinFailed, match="Meeting not found"):
        t.join(5.0)
    assert fake.clients[0].released


def test_daily_init_runs_once_across_transports(fake: FakeDaily) -> None:
    transports = [joined(fake, url=f"{URL}-{i}") for i in range(3)]
    assert fake.init_calls == 1
    transports[0].rejoin(5.0)
    assert fake.init_calls == 1
    assert all(t.connected for t in transports)


def test_the_double_refuses_what_aborts_the_real_sdk() -> None:
    sdk = FakeDaily()
    try:
        with pytest.raises(NotInitialised):
            sdk.CallClient()
        sdk.Daily.init()
        with pytest.raises(DoubleInit):
            sdk.Daily.init()
    finally:
        sdk.close()


def test_join_in_a_forked_child_is_refused(fake: FakeDaily, monkeypatch: pytest.MonkeyPatch) -> None:
    joined(fake)
    monkeypatch.setattr(daily_sdk.os, "getpid", lambda: -1)
    with pytest.raises(daily_sdk.ConfigError, match="fork"):
        transport(fake, url=f"{URL}-child").join(5.0)
    assert fake.init_calls == 1


# -- send ---------------------------------------------------------------------------------------


def test_send_before_join_is_room_disconnected_without_calling_the_sdk(fake: FakeDaily) -> None:
    t = transport(fake)
    with pytest.raises(RoomDisconnected):
        t.send(MESSAGE)
    assert fake.clients == []
    assert fake.init_calls == 0


def test_send_delivers_and_completion_runs_on_the_sdk_thread(fake: FakeDaily) -> None:
    t = joined(fake)
    for i in range(5):
        t.send({**MESSAGE, "n": i})
    client = fake.clients[0]
    assert [m["n"] for m in client.sent] == [0, 1, 2, 3, 4]
    assert client.completion_threads, "no completion ran"
    assert set(client.completion_threads) == {fake.sdk_thread_name}
    assert threading.current_thread().name not in client.completion_threads


def test_send_from_several_threads_does_not_deadlock(fake: FakeDaily) -> None:
    t = joined(fake)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(20):
                t.send({**MESSAGE, "k": k, "i": i})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not any(th.is_alive() for th in threads)
    assert errors == []
    assert len(fake.sent) == 80


def test_one_failed_send_fires_on_error_but_leaves_the_room_usable(fake: FakeDaily) -> None:
    # The real SDK fires on_error for a single failed request; that is not a lost call.
    t = joined(fake)
    fake.send_errors.append(CHANNEL_NOT_OPEN)
    with pytest.raises(SendFailed, match="ChannelNotOpen") as info:
        t.send({**MESSAGE, "n": 1})
    assert not isinstance(info.value, RoomDisconnected)
    fake.drain()  # the on_error that followed the completion has run
    assert t.connected
    t.send({**MESSAGE, "n": 2})
    assert [m["n"] for m in fake.sent] == [2]
    assert len(fake.clients) == 1, "no rejoin for one failed send"


def test_channel_not_open_again_and_again_is_a_lost_call(fake: FakeDaily) -> None:
    t = joined(fake)
    fake.send_errors.extend([CHANNEL_NOT_OPEN] * CHANNEL_FAILURES_BEFORE_LOST)
    for _ in range(CHANNEL_FAILURES_BEFORE_LOST - 1):
        with pytest.raises(SendFailed):
            t.send(MESSAGE)
    with pytest.raises(RoomDisconnected, match="ChannelNotOpen"):
        t.send(MESSAGE)
    assert not t.connected
    # The call is unusable now: the next send does not reach the SDK.
    with pytest.raises(RoomDisconnected):
        t.send(MESSAGE)
    assert fake.sent == []


def test_a_send_error_after_the_call_left_is_room_disconnected(fake: FakeDaily) -> None:
    t = joined(fake)
    client = fake.clients[0]
    client._set_state("left")  # the call is gone, but the session has not heard it yet
    session = t._session
    assert session is not None
    session.call_state = "left"
    session.lost_reason = None
    fake.send_errors.append("Call not joined")
    with pytest.raises(RoomDisconnected):
        t.send(MESSAGE)


def test_other_sdk_errors_are_send_failed_carrying_the_string(fake: FakeDaily) -> None:
    t = joined(fake)
    fake.send_errors.append("AppMessage(Signalling(PayloadTooLarge))")
    with pytest.raises(SendFailed, match=r"PayloadTooLarge") as info:
        t.send(MESSAGE)
    assert not isinstance(info.value, RoomDisconnected)
    # One failed message does not take the room down.
    assert t.connected
    t.send(MESSAGE)
    assert fake.sent == [MESSAGE]


def test_send_without_completion_times_out_as_send_failed(fake: FakeDaily) -> None:
    t = joined(fake, send_timeout_s=0.2)
    fake.hold_sends = True
    with pytest.raises(SendFailed, match="no answer"):
        t.send(MESSAGE)


# -- replica ------------------------------------------------------------------------------------


def test_wait_for_replica_returns_when_the_replica_joins(fake: FakeDaily) -> None:
    t = joined(fake, replica=False, replica_user_name="tavus-replica")
    fake.add_participant("someone-else")
    ready = threading.Event()

    def wait() -> None:
        t.wait_for_replica(10.0)
        ready.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    fake.drain()
    assert not ready.is_set()  # another participant is not the replica
    fake.add_participant("tavus-replica")
    waiter.join(10)
    assert ready.is_set()


def test_replica_already_in_the_room_at_join(fake: FakeDaily) -> None:
    fake.add_participant("tavus-replica")
    t = joined(fake, replica=False, replica_user_name="tavus-replica")
    t.wait_for_replica(0.0)


def test_any_remote_participant_is_the_replica_when_no_name_is_set(fake: FakeDaily) -> None:
    t = joined(fake, replica=False)
    fake.add_participant("whoever")
    fake.drain()
    t.wait_for_replica(0.0)


def test_wait_for_replica_times_out_with_replica_absent(fake: FakeDaily) -> None:
    t = joined(fake, replica=False, replica_user_name="tavus-replica")
    with pytest.raises(ReplicaAbsent, match="tavus-replica"):
        t.wait_for_replica(0.1)


def test_replica_that_left_is_absent(fake: FakeDaily) -> None:
    t = joined(fake, replica=False)
    pid = fake.add_participant("tavus-replica")
    fake.drain()
    t.wait_for_replica(0.0)
    fake.remove_participant(pid)
    fake.drain()
    with pytest.raises(ReplicaAbsent):
        t.wait_for_replica(0.0)


def test_wait_for_replica_before_join_is_room_disconnected(fake: FakeDaily) -> None:
    with pytest.raises(RoomDisconnected):
        transport(fake, replica=False).wait_for_replica(0.0)


def test_replica_app_messages_reach_on_event(fake: FakeDaily) -> None:
    events: list[dict[str, Any]] = []
    joined(fake, events=events)
    pid = fake.add_participant("tavus-replica")
    started = {"event_type": "conversation.replica.started_speaking", "inference_id": "i1"}
    fake.app_message_from(pid, started)
    fake.app_message_from(
        pid, '{"event_type": "conversation.replica.stopped_speaking", "inference_id": "i1"}'
    )
    fake.app_message_from(pid, "not json")
    fake.drain()
    events = [e for e in events if not e["event_type"].startswith("echoq.")]
    assert events == [started, {"event_type": "conversation.replica.stopped_speaking", "inference_id": "i1"}]


def test_a_failing_event_handler_does_not_break_the_room(fake: FakeDaily) -> None:
    def boom(event: dict[str, Any]) -> None:
        raise RuntimeError("handler bug")

    fake.add_participant("tavus-replica")
    t = DailyTransport(URL, settings=make_settings(), on_event=boom, daily_module=fake)
    t.join(5.0)
    fake.app_message_from("r1", {"event_type": "x"})
    fake.drain()
    t.send(MESSAGE)
    assert fake.sent == [MESSAGE]


# -- connection loss ----------------------------------------------------------------------------


def test_connection_drop_then_rejoin_then_sends_succeed(fake: FakeDaily) -> None:
    t = joined(fake)
    t.send({**MESSAGE, "n": 1})
    fake.drop_connection()
    fake.drain()
    assert not t.connected
    with pytest.raises(RoomDisconnected, match="connection lost"):
        t.send({**MESSAGE, "n": 2})
    t.rejoin(5.0)
    assert t.connected
    t.send({**MESSAGE, "n": 3})
    assert [m["n"] for m in fake.sent] == [1, 3]
    old, new = fake.clients
    assert old.released and not new.released


def test_network_interruption_and_call_state_mark_the_room_lost_but_on_error_does_not(fake: FakeDaily) -> None:
    t = joined(fake)
    client = fake.clients[0]
    client._event("on_network_connection_status_updated", {"event": "interrupted", "type": "signaling"})
    fake.drain()
    with pytest.raises(RoomDisconnected):
        t.send(MESSAGE)
    t.rejoin(5.0)
    fake.clients[1]._event("on_error", "meeting ended")
    fake.drain()
    assert t.connected, "on_error alone is informational"
    fake.clients[1]._set_state("error")
    fake.drain()
    with pytest.raises(RoomDisconnected, match="call state error"):
        t.send(MESSAGE)


def test_events_from_an_old_client_do_not_touch_the_new_join(fake: FakeDaily) -> None:
    t = joined(fake)
    old = fake.clients[0]
    t.rejoin(5.0)
    old.released = False  # let the stale client's event through, as a late one would
    old._event("on_call_state_updated", "left")
    old.released = True
    fake.drain()
    assert t.connected


def test_wait_for_replica_stops_when_the_connection_drops(fake: FakeDaily) -> None:
    t = joined(fake, replica=False)
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            t.wait_for_replica(30.0)
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    fake.drop_connection()
    waiter.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], RoomDisconnected)


# -- leave --------------------------------------------------------------------------------------


def test_leave_releases_and_is_idempotent(fake: FakeDaily) -> None:
    t = joined(fake)
    t.leave()
    client = fake.clients[0]
    assert client.state == "left"
    assert client.released
    assert not t.connected
    t.leave()
    with pytest.raises(RoomDisconnected):
        t.send(MESSAGE)


def test_leave_before_join_is_a_no_op(fake: FakeDaily) -> None:
    transport(fake).leave()
    assert fake.clients == []


def test_shutdown_all_releases_every_live_client(fake: FakeDaily) -> None:
    ts = [joined(fake, url=f"{URL}-{i}") for i in range(3)]
    ts[1].leave()
    shutdown_all()
    assert all(c.released for c in fake.clients)
    assert not any(t.connected for t in ts)
    fake.Daily.deinit()  # the double refuses this while any client is live


# -- replica presence ---------------------------------------------------------------------------


def test_replica_leaving_mid_utterance_pauses_sends_until_it_returns(fake: FakeDaily) -> None:
    events: list[dict[str, Any]] = []
    t = joined(fake, replica=False, events=events, replica_user_name="tavus-replica", replica_wait_timeout_s=30.0)
    first = fake.add_participant("tavus-replica")
    fake.add_participant("a person")  # a person in the room is not the replica
    for n in range(3):
        t.send({**MESSAGE, "n": n})
    fake.remove_participant(first)
    fake.drain()
    assert not t.replica_present
    done = threading.Event()

    def rest() -> None:
        for n in range(3, 6):
            t.send({**MESSAGE, "n": n})
        done.set()

    sender = threading.Thread(target=rest)
    sender.start()
    fake.drain()
    assert not done.wait(0.2)
    assert [m["n"] for m in fake.sent] == [0, 1, 2], "nothing is sent while the replica is away"
    fake.add_participant("tavus-replica")  # it returns (a new participant id)
    sender.join(30)
    assert done.is_set()
    assert [m["n"] for m in fake.sent] == [0, 1, 2, 3, 4, 5], "nothing lost, nothing twice, in order"
    presence = [e["event_type"] for e in events if e["event_type"].startswith("echoq.")]
    assert presence == [REPLICA_JOINED, REPLICA_LEFT, REPLICA_JOINED]


def test_a_send_waiting_for_an_absent_replica_gives_up_with_replica_absent(fake: FakeDaily) -> None:
    t = joined(fake, replica=False, replica_user_name="tavus-replica", replica_wait_timeout_s=0.1)
    fake.add_participant("a person")
    with pytest.raises(ReplicaAbsent, match="tavus-replica"):
        t.send(MESSAGE)
    assert fake.sent == []


def test_with_no_name_set_the_sender_of_replica_events_is_the_replica(fake: FakeDaily) -> None:
    t = joined(fake, replica=False)
    person = fake.add_participant("a person")
    replica = fake.add_participant("whoever")
    fake.app_message_from(replica, {"event_type": "conversation.replica.started_speaking"})
    fake.drain()
    fake.remove_participant(replica)
    fake.drain()
    assert not t.replica_present, "the person left in the room is not the replica"
    fake.add_participant("whoever")  # the replica returns under a new participant id
    fake.drain()
    assert t.replica_present
    fake.remove_participant(person)


# -- lifecycle ----------------------------------------------------------------------------------


def test_ctrl_c_during_a_join_leaves_and_releases_the_client(fake: FakeDaily, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.join_gate.clear()
    fake.join_error = "offline"
    t = transport(fake)

    caller = threading.current_thread()
    real_result = Future.result

    def interrupted(self: Any, timeout: float | None = None) -> Any:
        if threading.current_thread() is caller:  # Ctrl-C lands in the thread waiting on the join
            raise KeyboardInterrupt
        return real_result(self, timeout)

    monkeypatch.setattr(Future, "result", interrupted)
    with pytest.raises(KeyboardInterrupt):
        t.join(5.0)
    monkeypatch.undo()
    client = fake.clients[0]
    fake.join_gate.set()
    assert wait_for_cleanup(10.0)
    assert client.leave_calls == 1 and client.released


def test_shutdown_abandons_a_pending_join_at_once(fake: FakeDaily) -> None:
    fake.join_gate.clear()
    t = transport(fake)
    outcome: list[BaseException] = []

    def join() -> None:
        try:
            t.join(60.0)
        except BaseException as exc:
            outcome.append(exc)

    joiner = threading.Thread(target=join)
    joiner.start()
    while t._pending_join is None:  # the join has reached the SDK
        threading.Event().wait(0.01)
    shutdown_all(timeout=0.1)
    joiner.join(10)
    assert not joiner.is_alive(), "the join gave up without waiting for its timeout"
    assert len(outcome) == 1 and isinstance(outcome[0], JoinFailed)
    fake.join_gate.set()
    assert wait_for_cleanup(10.0)
    assert fake.clients[0].released


# -- microphone echo ----------------------------------------------------------------------------


def test_microphone_frames_go_through_a_custom_track_set_as_the_microphone(fake: FakeDaily) -> None:
    t = joined(fake)
    fake.audio_speed = 0
    pcm = b"\x01\x00" * 240
    t.write_frames(pcm, 24000)
    t.write_frames(pcm, 24000)
    (source,) = fake.sources
    assert (source.sample_rate, source.channels) == (24000, 1)
    assert source.written == [pcm, pcm]
    assert fake.microphones == [], "no virtual microphone device: it writes nothing outside a live call"
    client = fake.clients[0]
    (inputs,) = client.inputs_updates
    track_id = inputs["microphone"]["settings"]["customTrack"]["id"]
    assert inputs == {"camera": False, "microphone": {"isEnabled": True, "settings": {"customTrack": {"id": track_id}}}}
    assert client.publishing_updates == [{"microphone": {"isPublishing": True}}]


def test_a_short_microphone_write_is_an_error(fake: FakeDaily) -> None:
    t = joined(fake)
    fake.audio_speed = 0
    fake.short_writes.append(100)
    with pytest.raises(SendFailed, match="took 100 of 480 frames"):
        t.write_frames(b"\0\0" * 480, 24000)
    t.write_frames(b"\0\0" * 480, 24000)


def test_many_conversations_each_have_their_own_microphone_track(fake: FakeDaily) -> None:
    fake.audio_speed = 0
    ts = [joined(fake, url=f"{URL}-{i}") for i in range(5)]
    for i, t in enumerate(ts):
        t.write_frames(bytes([i, 0]) * 160, 16000)
    assert len(fake.sources) == 5
    assert [s.written for s in fake.sources] == [[bytes([i, 0]) * 160] for i in range(5)]
    ids = {c.inputs_updates[0]["microphone"]["settings"]["customTrack"]["id"] for c in fake.clients}
    assert len(ids) == 5


def test_microphone_is_re_enabled_on_the_new_client_after_rejoin(fake: FakeDaily) -> None:
    fake.audio_speed = 0
    t = joined(fake)
    t.write_frames(b"\0\0" * 160, 16000)
    t.rejoin(5.0)
    t.write_frames(b"\0\0" * 160, 16000)
    assert len(fake.sources) == 1
    assert len(fake.clients[1].inputs_updates) == 1


def test_microphone_needs_a_joined_room_and_whole_samples(fake: FakeDaily) -> None:
    t = transport(fake)
    with pytest.raises(RoomDisconnected):
        t.write_frames(b"\0\0", 16000)
    t.join(5.0)
    with pytest.raises(InvalidInput):
        t.write_frames(b"\0", 16000)


# -- secrets ------------------------------------------------------------------------------------


def test_token_never_appears_in_errors_or_logs(fake: FakeDaily, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="echoq")
    url = f"{URL}?t={TOKEN}"
    raised: list[BaseException] = []

    fake.join_error = f"could not join {url}: forbidden"
    t = transport(fake, url=url)
    with pytest.raises(JoinFailed) as info:
        t.join(5.0)
    raised.append(info.value)

    fake.join_gate.clear()
    with pytest.raises(JoinFailed) as info:
        t.join(0.1)
    raised.append(info.value)

    fake.join_error = None
    fake.join_gate.set()
    t.join(5.0)
    fake.send_errors.extend([f"rejected token={TOKEN}"] + [f"{CHANNEL_NOT_OPEN} {url}"] * CHANNEL_FAILURES_BEFORE_LOST)
    for expected in [SendFailed] * CHANNEL_FAILURES_BEFORE_LOST + [RoomDisconnected]:
        with pytest.raises(expected) as sinfo:
            t.send(MESSAGE)
        raised.append(sinfo.value)
    t.rejoin(5.0)
    fake.clients[-1]._event("on_error", f"ejected from {url}")
    fake.clients[-1]._set_state("left")
    fake.drain()
    with pytest.raises(RoomDisconnected) as rinfo:
        t.send(MESSAGE)
    raised.append(rinfo.value)

    for exc in raised:
        assert TOKEN not in str(exc) and TOKEN not in repr(exc)
        assert exc.__cause__ is None or TOKEN not in str(exc.__cause__)
    assert "example.daily.co/room-1" in str(raised[0])
    assert caplog.records, "expected lifecycle log lines"
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


# -- the sender over Daily: the replica leaves mid-utterance --------------------------------------


def test_replica_leaving_mid_utterance_nothing_lost_nothing_to_an_empty_room(fake: FakeDaily) -> None:
    rate = 24000
    pcm = (0.3 * 32767 * np.sin(np.arange(int(0.4 * rate)) * 0.05)).astype("<i2").tobytes()  # 10 chunks
    store = MemoryStore()
    store.add_audio("u1", pcm)
    replica = fake.add_participant("tavus-replica")
    t = joined(fake, replica_user_name="tavus-replica", replica_wait_timeout_s=30.0)
    at_return: list[int] = []

    def back() -> None:
        fake.add_participant("tavus-replica")  # the replica returns (a new participant id)

    original_send = t.send

    def send(message: dict[str, Any]) -> None:
        original_send(message)
        if len(fake.sent) == 4:  # the replica leaves after the fourth chunk
            fake.remove_participant(replica)
            fake.drain()
            threading.Timer(0.2, lambda: (at_return.append(len(fake.sent)), back())).start()

    t.send = send  # type: ignore[method-assign]
    sender = Sender(CID, store=store, transport=t, settings=make_settings(replica_wait_timeout_s=30.0),  # type: ignore[arg-type]
                    token=LEASE, wake=threading.Event(), stopping=lambda: False, wire_id="tavus-c9")
    assert sender.drain() == 1
    assert at_return == [4], "nothing went to the room while the replica was away"
    props = [m["properties"] for m in fake.sent]
    assert len(props) == 10
    assert b"".join(base64.b64decode(p["audio"]) for p in props) == pcm, "every sample once, in order"
    assert [p["done"] for p in props] == [False] * 9 + [True]
    assert {p["inference_id"] for p in props} == {"u1"}
    assert {m["conversation_id"] for m in fake.sent} == {"tavus-c9"}
    assert store.state("u1") == "sent"
