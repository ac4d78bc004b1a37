"""worker.transports.daily against the in-memory ``daily`` double (tests/doubles/fake_daily.py).

The double delivers every completion and event on its own SDK thread, like daily-python, so
these tests exercise the real hand-off between that thread and the caller's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.doubles.fake_daily import CHANNEL_NOT_OPEN, DoubleInit, FakeDaily, NotInitialised
from worker.errors import InvalidInput, JoinFailed, ReplicaAbsent, RoomDisconnected, SendFailed
from worker.settings import Settings
from worker.transports import daily as daily_mod
from worker.transports.daily import CLIENT_SETTINGS, DailyTransport, shutdown_all, wait_for_cleanup

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
    fake: FakeDaily, url: str = URL, events: list[dict[str, Any]] | None = None, **settings: Any
) -> DailyTransport:
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
    monkeypatch.setattr(daily_mod.os, "getpid", lambda: -1)
    with pytest.raises(daily_mod.ConfigError, match="fork"):
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


def test_channel_not_open_is_room_disconnected(fake: FakeDaily) -> None:
    t = joined(fake)
    fake.send_errors.append(CHANNEL_NOT_OPEN)
    with pytest.raises(RoomDisconnected, match="ChannelNotOpen"):
        t.send(MESSAGE)
    # The call is unusable now: the next send does not reach the SDK.
    with pytest.raises(RoomDisconnected):
        t.send(MESSAGE)
    assert fake.sent == []


@pytest.mark.parametrize("error", ["Call not joined", "call state is left"])
def test_not_joined_states_are_room_disconnected(fake: FakeDaily, error: str) -> None:
    t = joined(fake)
    fake.send_errors.append(error)
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
    t = joined(fake, replica_user_name="tavus-replica")
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
    t = joined(fake, replica_user_name="tavus-replica")
    t.wait_for_replica(0.0)


def test_any_remote_participant_is_the_replica_when_no_name_is_set(fake: FakeDaily) -> None:
    t = joined(fake)
    fake.add_participant("whoever")
    fake.drain()
    t.wait_for_replica(0.0)


def test_wait_for_replica_times_out_with_replica_absent(fake: FakeDaily) -> None:
    t = joined(fake, replica_user_name="tavus-replica")
    with pytest.raises(ReplicaAbsent, match="tavus-replica"):
        t.wait_for_replica(0.1)


def test_replica_that_left_is_absent(fake: FakeDaily) -> None:
    t = joined(fake)
    pid = fake.add_participant("tavus-replica")
    fake.drain()
    t.wait_for_replica(0.0)
    fake.remove_participant(pid)
    fake.drain()
    with pytest.raises(ReplicaAbsent):
        t.wait_for_replica(0.0)


def test_wait_for_replica_before_join_is_room_disconnected(fake: FakeDaily) -> None:
    with pytest.raises(RoomDisconnected):
        transport(fake).wait_for_replica(0.0)


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
    assert events == [started, {"event_type": "conversation.replica.stopped_speaking", "inference_id": "i1"}]


def test_a_failing_event_handler_does_not_break_the_room(fake: FakeDaily) -> None:
    def boom(event: dict[str, Any]) -> None:
        raise RuntimeError("handler bug")

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


def test_network_interruption_and_call_errors_mark_the_room_lost(fake: FakeDaily) -> None:
    t = joined(fake)
    client = fake.clients[0]
    client._event("on_network_connection_status_updated", {"event": "interrupted", "type": "signaling"})
    fake.drain()
    with pytest.raises(RoomDisconnected):
        t.send(MESSAGE)
    t.rejoin(5.0)
    fake.clients[1]._event("on_error", "meeting ended")
    fake.drain()
    with pytest.raises(RoomDisconnected, match="meeting ended"):
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
    t = joined(fake)
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


# -- microphone echo ----------------------------------------------------------------------------


def test_microphone_frames_are_written_through_a_virtual_device(fake: FakeDaily) -> None:
    t = joined(fake)
    pcm = b"\x01\x00" * 240
    t.write_frames(pcm, 24000)
    t.write_frames(pcm, 24000)
    (mic,) = fake.microphones.values()
    assert (mic.sample_rate, mic.channels, mic.non_blocking) == (24000, 1, False)
    assert mic.frames == [pcm, pcm]
    client = fake.clients[0]
    assert client.inputs_updates == [
        {"camera": False, "microphone": {"isEnabled": True, "settings": {"deviceId": mic.name}}}
    ]
    assert client.publishing_updates == [{"microphone": {"isPublishing": True}}]


def test_microphone_is_re_enabled_on_the_new_client_after_rejoin(fake: FakeDaily) -> None:
    t = joined(fake)
    t.write_frames(b"\0\0" * 160, 16000)
    t.rejoin(5.0)
    t.write_frames(b"\0\0" * 160, 16000)
    assert len(fake.microphones) == 1
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
    fake.send_errors.extend([f"rejected token={TOKEN}", f"{CHANNEL_NOT_OPEN} {url}"])
    for expected in (SendFailed, RoomDisconnected):
        with pytest.raises(expected) as sinfo:
            t.send(MESSAGE)
        raised.append(sinfo.value)
    t.rejoin(5.0)
    fake.clients[-1]._event("on_error", f"ejected from {url}")
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
