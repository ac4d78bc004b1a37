"""Shared fixtures.

Tests that need Redis use a dedicated database (``ECHOQ_TEST_REDIS_URL``, default
``redis://127.0.0.1:6379/15``; parallel workers take the databases below it), flushed before
and after each test. Locally they skip when Redis does not answer; under CI (``CI=true``) they
fail instead, so a missing Redis can never turn into a green run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis


def _test_redis_url() -> str:
    """``ECHOQ_TEST_REDIS_URL`` (default database 15). Run in parallel (pytest-xdist), worker
    ``gwN`` takes the database 2N below it (15, 13, …: 14 is the demo's), so parallel tests never
    flush each other's keys, nor the demo's."""
    base = os.environ.get("ECHOQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or worker == "gw0":
        return base
    head, _, db = base.rpartition("/")
    return f"{head}/{int(db or 0) - 2 * int(worker[2:])}"


TEST_REDIS_URL = _test_redis_url()
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Everything this test process (and every worker it starts) does goes to the test database,
# never to a database someone uses. Set before any echoq module reads its settings.
os.environ["ECHOQ_REDIS_URL"] = TEST_REDIS_URL
os.environ.pop("ECHOQ_BROKER_URL", None)


def _redis_or_skip() -> redis.Redis:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        if IN_CI:
            pytest.fail(f"Redis at {TEST_REDIS_URL} is required under CI: {exc}")
        pytest.skip(f"Redis at {TEST_REDIS_URL} is not answering: {exc}")
    return client


@pytest.fixture
def redis_url() -> str:
    return TEST_REDIS_URL


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    """A client on the clean test database."""
    client = _redis_or_skip()
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch, redis_client: redis.Redis) -> Iterator[None]:
    """Point echoq's settings at the test database for this process and for children."""
    from worker.settings import get_settings

    monkeypatch.setenv("ECHOQ_REDIS_URL", TEST_REDIS_URL)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(autouse=True)
def _restore_echoq_logging() -> Iterator[None]:
    """Leave the ``echoq`` loggers as each test found them: a test (or a CLI command run in
    process) that calls ``setup_logging`` must not change what later tests see on stderr."""
    import logging

    root = logging.getLogger("echoq")
    saved = (list(root.handlers), root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved
