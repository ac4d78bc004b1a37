"""Replica events as a worker records them: each start and stop once, and the replica's
presence (from the transport) in the conversation's state and events. Real Redis, no worker."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.conftest import TEST_REDIS_URL
from worker import echo
from worker.sessions import SessionManager
from worker.settings import Settings
from worker.store import Store
from worker.transports.base import REPLICA_JOINED, REPLICA_LEFT

pytestmark = pytest.mark.redis

CID = "events-1"


@pytest.fixture
def manager(redis_client: redis.Redis) -> Iterator[SessionManager]:
    settings = Settings(_env_file=None, redis_url=TEST_REDIS_URL)  # type: ignore[call-arg]
    mgr = SessionManager(None, settings, redis_client, hostname="events-test@localhost")  # type: ignore[arg-type]
    yield mgr
    mgr._pool.shutdown(wait=False)


def sent_utterance(store: Store, uid: str, inference_id: str) -> None:
    store.open_conversation(CID, "loopback://events-room")
    entry = {"utterance_id": uid, "kind": "text", "text": "Hi", "inference_id": inference_id}
    store.enqueue(CID, entry, {"id": uid, "conversation_id": CID, "inference_id": inference_id, "kind": "text"})
    assert store.start_utterance(uid) == 1
    assert store.mark_sent(uid, 1) == "sent"


def recorded(store: Store, kind: str) -> list[dict[str, Any]]:
    return [e for _i, e in store.events(CID, count=1000) if e["type"] == kind]


def test_a_stop_that_arrives_as_both_kinds_of_event_is_recorded_once(manager: SessionManager) -> None:
    store = manager.store
    sent_utterance(store, "u1", "inf-1")
    replica_stop = {"event_type": echo.STOPPED_SPEAKING, "inference_id": "inf-1", "seq": 7, "turn_idx": 0,
                    "properties": {"duration": 1.5, "interrupted": False}}
    role_stop = {"event_type": "conversation.stopped_speaking", "inference_id": "inf-1", "seq": 8, "turn_idx": 0,
                 "properties": {"role": "replica", "duration": 1.5, "interrupted": False}}
    start = {"event_type": echo.STARTED_SPEAKING, "inference_id": "inf-1", "seq": 6, "turn_idx": 0}
    role_start = {"event_type": "conversation.started_speaking", "inference_id": "inf-1", "seq": 5,
                  "properties": {"role": "replica"}}
    for event in (role_start, start, replica_stop, role_stop, replica_stop):
        manager._on_room_event(CID, event)
    assert len(recorded(store, "replica.started_speaking")) == 1
    assert len(recorded(store, "replica.stopped_speaking")) == 1
    assert (store.utterance("u1") or {})["state"] == "spoken"


def test_a_user_stopping_is_not_the_replica_stopping(manager: SessionManager) -> None:
    store = manager.store
    sent_utterance(store, "u2", "inf-2")
    manager._on_room_event(CID, {"event_type": "conversation.stopped_speaking", "inference_id": "inf-2",
                                 "properties": {"role": "user"}})
    assert recorded(store, "replica.stopped_speaking") == []
    assert (store.utterance("u2") or {})["state"] == "sent"


def test_the_replica_leaving_and_returning_is_in_the_state_and_the_events(manager: SessionManager) -> None:
    store = manager.store
    store.open_conversation(CID, "https://tavus.daily.co/c1")
    manager._on_room_event(CID, {"event_type": REPLICA_JOINED})
    assert (store.conversation(CID) or {})["replica"] == "present"
    manager._on_room_event(CID, {"event_type": REPLICA_LEFT})
    assert (store.conversation(CID) or {})["replica"] == "absent"
    manager._on_room_event(CID, {"event_type": REPLICA_JOINED})
    assert (store.conversation(CID) or {})["replica"] == "present"
    kinds = [e["type"] for _i, e in store.events(CID, count=1000) if e["type"].startswith("replica.")]
    assert kinds == ["replica.joined", "replica.left", "replica.joined"]
