"""The supervisor of one worker process, in this process, on the real test Redis and Celery app:
it keeps renewing every lease while rooms are left slowly, and it sheds when it cannot keep up."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import wait_for
from worker import keys
from worker.celery_app import app
from worker.sessions import Session, SessionManager
from worker.settings import Settings
from worker.store import Store

pytestmark = pytest.mark.redis

HOST = "supervision-test@localhost"


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"redis_url": TEST_REDIS_URL, "lease_ttl_s": 3, "scan_interval_s": 0.1,
                              "max_sessions": 200, **overrides}
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def made(redis_client: redis.Redis) -> Iterator[list[SessionManager]]:
    """The managers a test makes; each is shut down at the end."""
    managers: list[SessionManager] = []
    yield managers
    for mgr in managers:
        mgr.shutdown()


def holding(made: list[SessionManager], client: redis.Redis, count: int, prefix: str, **overrides: Any
            ) -> tuple[SessionManager, dict[str, Session]]:
    """A manager that holds ``count`` loopback conversations (no replica to wait for)."""
    mgr = SessionManager(app, settings(**overrides), client, hostname=HOST, threads=8)
    made.append(mgr)
    held = {}
    for n in range(count):
        cid = f"{prefix}-{n:03d}"
        mgr.store.open_conversation(cid, f"loopback://{cid}-room?replica=0")
        session = mgr.adopt(cid)
        assert session is not None, f"{cid} was not adopted"
        held[cid] = session
    return mgr, held


class Renewals:
    """Counts the supervisor's renewals of each lease."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.of: Counter[str] = Counter()
        original = store.renew_leases

        def counted(leases: list[tuple[str, str, int | None]], ttl_s: float) -> list[bool]:
            self.of.update(cid for cid, _token, _epoch in leases)
            return original(leases, ttl_s)

        monkeypatch.setattr(store, "renew_leases", counted)

    def fewest(self, cids: list[str]) -> int:
        return min(self.of[cid] for cid in cids)


def test_leases_stay_held_while_many_rooms_are_left_through_a_stalled_broadcast(
    made: list[SessionManager], redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # shedding off: this test is about renewing, and a slow CI machine must not shed here
    mgr, held = holding(made, redis_client, 80, "sup", shed_late_fraction=0, shed_late_chunks=0)
    lose = sorted(held)[::2]
    keep = sorted(set(held) - set(lose))

    # every broadcast that cancels a queue's consumer stalls until the test lets it go
    gate = threading.Event()
    stalled: list[str] = []
    cancel = app.control.cancel_consumer

    def stalling(queue: str, **kwargs: Any) -> Any:
        stalled.append(queue)
        gate.wait(120)
        return cancel(queue, **kwargs)

    monkeypatch.setattr(app.control, "cancel_consumer", stalling)
    renewals = Renewals(mgr.store, monkeypatch)
    mgr.start()
    try:
        # another worker took half of the conversations (their owner's renewal now fails)
        for cid in lose:
            redis_client.set(keys.lease(cid), "thief@elsewhere:0", px=120_000)
        wait_for(lambda: not set(lose) & set(mgr.sessions), 30, what="the lost sessions to be let go")
        for cid in lose:  # stopped and fenced at once, although their rooms are not left yet
            assert held[cid].stopped and not held[cid].fence.is_open()
        wait_for(lambda: stalled, 30, what="a leave to stall in its broadcast")
        assert any(held[cid].transport.connected for cid in lose)  # some rooms are still being left

        # the supervisor goes on renewing every other lease (each is renewed every third of its
        # TTL), so for well over two lease TTLs, while the leaves stall
        after = renewals.fewest(keep)
        wait_for(lambda: renewals.fewest(keep) >= after + 7, 60, what="the supervisor to keep renewing")
        assert sorted(mgr.sessions) == keep
        for cid in keep:
            assert redis_client.get(keys.lease(cid)) == held[cid].token.encode(), f"{cid} lost its lease"
        assert not gate.is_set() and all(held[cid].transport.connected for cid in keep)
    finally:
        gate.set()
    # once the broker answers, every lost conversation's room is left; the thief keeps its lease
    wait_for(lambda: not mgr._leaving, 60, what="every leave to finish")
    assert not any(held[cid].transport.connected for cid in lose)
    assert len(stalled) == len(lose)
    assert all(redis_client.get(keys.lease(cid)) == b"thief@elsewhere:0" for cid in lose)
    assert sorted(mgr.sessions) == keep
    mgr.shutdown()
    made.remove(mgr)
    assert not any(redis_client.exists(keys.lease(cid)) for cid in keep)  # handed back at shutdown


def heartbeat(client: redis.Redis) -> dict[str, Any]:
    return dict(json.loads(client.hget(keys.WORKERS, HOST) or b"{}"))


def test_a_worker_whose_scans_wake_late_stops_adopting_and_sheds_its_newest_idle_conversation(
    made: list[SessionManager], redis_client: redis.Redis
) -> None:
    # the supervisor thread is not started: each scan is run here, told how late it woke
    mgr, held = holding(made, redis_client, 4, "shed", lease_ttl_s=10, shed_late_fraction=0.25)
    newest = max(held, key=lambda cid: held[cid].taken_at)
    busy = held[newest]
    busy.lock.acquire()  # its sender is in the middle of an utterance: idle ones go first
    busy.draining = True
    try:
        mgr._tick(late_s=0.0)
        assert heartbeat(redis_client)["max_sessions"] == 200
        mgr._tick(late_s=5.0)  # one late scan is a hiccup (a pause, a freeze)
        assert sorted(mgr.sessions) == sorted(held) and heartbeat(redis_client)["max_sessions"] == 200
        mgr._tick(late_s=5.0)  # two in a row: it cannot keep up
        beat = heartbeat(redis_client)
        assert beat["shedding"] and beat["max_sessions"] == len(mgr.sessions)
    finally:
        busy.draining = False
        busy.lock.release()
    # the newest idle conversation went, with its reason, and its lease is free for another worker
    shed = max(set(held) - {newest}, key=lambda cid: held[cid].taken_at)
    assert shed not in mgr.sessions and held[shed].stopped
    events = [e for _id, e in mgr.store.events(shed, count=100) if e["type"] == "conversation.shed"]
    assert len(events) == 1 and events[0]["worker"] == HOST and "late" in events[0]["reason"]
    assert mgr.store.lease_owner(shed) is None
    wait_for(lambda: not held[shed].transport.connected, 30, what="the shed room to be left")
    # nothing is adopted during the cooldown: neither the shed conversation nor a new one
    mgr.store.open_conversation("shed-new", "loopback://shed-new-room?replica=0")
    assert mgr.adopt(shed) is None and mgr.adopt("shed-new") is None
    # one conversation per lease TTL: a third late scan right after sheds nothing more
    mgr._tick(late_s=5.0)
    assert len(mgr.sessions) == 3
    for cid in mgr.sessions:
        assert mgr.store.lease_owner(cid) == held[cid].token


def test_a_shed_conversation_mid_utterance_goes_only_between_two_utterances(
    made: list[SessionManager], redis_client: redis.Redis
) -> None:
    mgr, held = holding(made, redis_client, 2, "between", shed_late_fraction=0.25)
    first, second = sorted(held, key=lambda cid: held[cid].taken_at)
    session = held[second]
    session.shedding = "test"
    session.mid_utterance = True  # a piece of an utterance is out, more are to come
    assert not session.sender.stopping()
    session.mid_utterance = False  # its last piece is out
    assert session.sender.stopping()
    assert not held[first].sender.stopping()


def test_an_interrupt_is_pushed_to_its_owner_which_pokes_the_room_at_once(
    made: list[SessionManager], redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interrupt script publishes the conversation id; the owner's listener pokes that session
    (and no other), without waiting for the room's next message or the Celery doorbell."""
    mgr, held = holding(made, redis_client, 2, "push")
    poked: list[str] = []
    for cid, session in held.items():
        monkeypatch.setattr(session, "poke", lambda cid=cid: poked.append(cid))
    mgr.start()
    wait_for(lambda: any(t.name == "echoq-interrupts" for t in threading.enumerate()), 10, what="the listener")
    wait_for(lambda: redis_client.pubsub_numsub(keys.interrupts_channel(mgr.store.db))[0][1] >= 1, 10,
             what="the listener to subscribe")
    mgr.store.interrupt("push-001")
    wait_for(lambda: poked == ["push-001"], 10, what="the owner to poke the interrupted room")
    assert redis_client.publish(keys.interrupts_channel(mgr.store.db + 1), "push-000") == 0  # another database's
    mgr.store.interrupt("push-001")
    wait_for(lambda: len(poked) == 2, 10, what="the second interrupt's poke")
    assert poked == ["push-001", "push-001"]  # nothing for the same id in another database
