"""Property-based run of the HTTP API against its own OpenAPI spec: no input makes it answer 5xx.

Every operation gets generated requests (valid and invalid) with a valid token, against the app
on the real test Redis, with a fake Tavus behind persona-based opening.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from producer.api import create_app
from producer.client import EchoqClient
from producer.tavus import TavusClient
from tests.conftest import TEST_REDIS_URL
from tests.fake_tavus import FakeTavus

pytestmark = pytest.mark.redis

TOKEN = "schemathesis-token-41c7"


#: the fake Tavus of the running test; persona-based opening talks to it
_TAVUS: dict[str, FakeTavus] = {}


def _tavus_client() -> TavusClient:
    fake = _TAVUS["fake"]
    return TavusClient(fake.api_key, fake.url, max_retries=0, timeout=5)


# Loading the spec only asks the app for /openapi.json: nothing touches Redis or Tavus yet.
APP = create_app(
    tokens=[TOKEN],
    client=EchoqClient(TEST_REDIS_URL),
    tavus_factory=_tavus_client,
    max_body_bytes=256 * 1024,
    stream_max_s=0.5,  # an event stream on a conversation that a case opened must still end
    stream_block_ms=100,
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture
def fake_tavus(redis_client: redis.Redis) -> Iterator[FakeTavus]:
    """A clean test database with the spec's example conversation open, and a fake Tavus with one
    echo persona."""
    APP.state.echoq.open("demo", "loopback://demo-room")
    with FakeTavus() as tavus:
        tavus.add_persona("echo", default_replica_id="r1")
        _TAVUS["fake"] = tavus
        yield tavus
        _TAVUS.clear()


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_makes_the_api_fail(case: schemathesis.Case, fake_tavus: FakeTavus) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=[not_a_server_error])
