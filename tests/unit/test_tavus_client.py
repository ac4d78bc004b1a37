"""The Tavus REST client against the fake Tavus server: calls, retries, errors, and the key."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from producer.tavus import (
    TavusAuthError,
    TavusClient,
    TavusConcurrencyLimit,
    TavusConfigError,
    TavusError,
    TavusHTTPError,
    TavusNotFound,
    TavusRateLimited,
    TavusRejected,
    TavusServerError,
    TavusUnavailable,
    _parse_retry_after,
)
from tests.fake_tavus import (
    FakeTavus,
    fake_tavus_fixture,  # noqa: F401  (the fake_tavus fixture)
    unused_url,
)
from worker.errors import EchoqError, PermanentError, RetryableError
from worker.settings import Settings


class Sleeps:
    """Records the waits between attempts instead of waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(fake_tavus: FakeTavus, sleeps: Sleeps) -> Iterator[TavusClient]:
    with TavusClient(fake_tavus.api_key, fake_tavus.url, timeout=5.0, sleep=sleeps) as c:
        yield c


@pytest.fixture
def tavus_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture the client's log lines even if something turned off propagation to the root."""
    log = logging.getLogger("echoq.tavus")
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(caplog.handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False  # the handler is attached here; do not count each line twice
    yield caplog
    log.setLevel(old_level)
    log.propagate = old_propagate
    log.removeHandler(caplog.handler)


def _strings_of(exc: BaseException) -> list[str]:
    """Every text an exception shows: str, repr, args, and each chained cause's str and repr."""
    out: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        out += [str(seen), repr(seen), *map(str, seen.args)]
        out += [str(getattr(seen, "message", ""))]
        seen = seen.__cause__ or seen.__context__
    return out


# --- each call ----------------------------------------------------------------------------------


def test_create_persona_is_always_echo(client: TavusClient, fake_tavus: FakeTavus) -> None:
    made = client.create_persona(
        "Narrator", system_prompt="read the script", context="ctx", pipeline_mode="full"
    )

    assert made["persona_id"].startswith("p")
    assert made["persona_name"] == "Narrator"
    (req,) = fake_tavus.requests("POST", "/v2/personas")
    assert req.body == {
        "persona_name": "Narrator",
        "pipeline_mode": "echo",
        "system_prompt": "read the script",
        "context": "ctx",
    }
    assert req.headers["x-api-key"] == fake_tavus.api_key
    assert fake_tavus.state.personas[made["persona_id"]]["pipeline_mode"] == "echo"


def test_create_persona_leaves_out_a_missing_system_prompt(
    client: TavusClient, fake_tavus: FakeTavus
) -> None:
    client.create_persona("Quiet")
    assert fake_tavus.requests("POST")[0].body == {"persona_name": "Quiet", "pipeline_mode": "echo"}


def test_list_and_get_personas(client: TavusClient, fake_tavus: FakeTavus) -> None:
    a = client.create_persona("A")
    b = client.create_persona("B")

    listed = client.list_personas()
    assert listed["total_count"] == 2
    assert {p["persona_id"] for p in listed["data"]} == {a["persona_id"], b["persona_id"]}

    got = client.get_persona(b["persona_id"])
    assert got["persona_name"] == "B"
    assert got["pipeline_mode"] == "echo"


def test_list_personas_passes_paging(client: TavusClient, fake_tavus: FakeTavus) -> None:
    client.list_personas(limit=5, page=2)
    assert fake_tavus.requests("GET")[0].path == "/v2/personas?limit=5&page=2"


def test_get_unknown_persona_is_not_found(client: TavusClient, fake_tavus: FakeTavus) -> None:
    with pytest.raises(TavusNotFound) as info:
        client.get_persona("p-missing")
    assert info.value.status == 404
    assert info.value.message == "Persona not found"
    assert "Persona not found" in str(info.value)
    assert "GET /personas/p-missing" in str(info.value)
    assert fake_tavus.request_count == 1


def test_conversation_lifecycle(client: TavusClient, fake_tavus: FakeTavus) -> None:
    persona = client.create_persona("Host")
    conv = client.create_conversation(
        persona["persona_id"],
        replica_id="r79e1c033f",
        conversation_name="Morning show",
        callback_url="https://example.test/hook",
        properties={
            "max_call_duration": 600,
            "participant_left_timeout": 30,
            "participant_absent_timeout": 60,
        },
    )
    cid = conv["conversation_id"]
    assert conv["status"] == "active"
    assert conv["conversation_url"] == f"https://tavus.daily.co/{cid}"
    assert fake_tavus.requests("POST", "/v2/conversations")[0].body == {
        "persona_id": persona["persona_id"],
        "replica_id": "r79e1c033f",
        "conversation_name": "Morning show",
        "callback_url": "https://example.test/hook",
        "properties": {
            "max_call_duration": 600,
            "participant_left_timeout": 30,
            "participant_absent_timeout": 60,
        },
    }

    got = client.get_conversation(cid)
    assert got["status"] == "active"
    assert got["persona_id"] == persona["persona_id"]
    assert got["properties"]["max_call_duration"] == 600

    assert client.end_conversation(cid) == {}
    assert client.get_conversation(cid)["status"] == "ended"

    client.delete_conversation(cid)
    assert fake_tavus.requests("DELETE")[-1].path == f"/v2/conversations/{cid}"
    with pytest.raises(TavusNotFound):
        client.get_conversation(cid)


def test_create_conversation_sends_only_what_is_given(client: TavusClient, fake_tavus: FakeTavus) -> None:
    persona = fake_tavus.add_persona(default_replica_id="r-default")
    conv = client.create_conversation(persona["persona_id"])
    assert fake_tavus.requests("POST")[0].body == {"persona_id": persona["persona_id"]}
    assert fake_tavus.state.conversations[conv["conversation_id"]]["replica_id"] == "r-default"


def test_ids_are_one_path_segment(client: TavusClient, fake_tavus: FakeTavus) -> None:
    with pytest.raises(TavusNotFound):
        client.get_conversation("../personas")
    assert fake_tavus.requests()[0].path == "/v2/conversations/..%2Fpersonas"


@pytest.mark.parametrize("bad", ["", "  "])
def test_empty_ids_and_names_fail_before_any_request(
    client: TavusClient,
    fake_tavus: FakeTavus,
    bad: str,
) -> None:
    for call in (
        lambda: client.get_persona(bad),
        lambda: client.get_conversation(bad),
        lambda: client.end_conversation(bad),
        lambda: client.delete_conversation(bad),
        lambda: client.create_persona(bad),
        lambda: client.create_conversation(bad),
    ):
        with pytest.raises(ValueError):
            call()
    assert fake_tavus.request_count == 0


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "", "   ", SecretStr("")])
def test_missing_key_says_to_set_tavus_api_key(key: Any) -> None:
    with pytest.raises(TavusConfigError, match="TAVUS_API_KEY"):
        TavusClient(key)


def test_from_settings_reads_key_and_base_url(monkeypatch: pytest.MonkeyPatch, fake_tavus: FakeTavus) -> None:
    monkeypatch.setenv("TAVUS_API_KEY", fake_tavus.api_key)
    monkeypatch.setenv("ECHOQ_TAVUS_BASE_URL", fake_tavus.url + "/")
    client = TavusClient.from_settings(Settings(_env_file=None))  # type: ignore[call-arg]
    assert client.base_url == fake_tavus.url
    assert client.list_personas()["data"] == []
    assert fake_tavus.api_key not in repr(client)


def test_from_settings_without_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAVUS_API_KEY", raising=False)
    monkeypatch.delenv("ECHOQ_TAVUS_API_KEY", raising=False)
    with pytest.raises(TavusConfigError, match="TAVUS_API_KEY"):
        TavusClient.from_settings(Settings(_env_file=None))  # type: ignore[call-arg]


def test_default_base_url() -> None:
    assert TavusClient("k").base_url == "https://tavusapi.com/v2"


@pytest.mark.parametrize(
    "url", ["ftp://tavusapi.com/v2", "tavusapi.com/v2", "https://user:pw@tavusapi.com/v2"]
)
def test_bad_base_url(url: str) -> None:
    with pytest.raises(TavusConfigError):
        TavusClient("k", url)


def test_error_tree() -> None:
    assert issubclass(TavusError, EchoqError)
    for cls in (
        TavusAuthError,
        TavusNotFound,
        TavusRejected,
        TavusRateLimited,
        TavusServerError,
        TavusUnavailable,
    ):
        assert issubclass(cls, TavusHTTPError)
    permanent: tuple[type[TavusError], ...] = (TavusAuthError, TavusNotFound, TavusRejected, TavusConfigError)
    for perm in permanent:
        assert issubclass(perm, PermanentError)
    for cls in (TavusRateLimited, TavusServerError, TavusUnavailable):
        assert issubclass(cls, RetryableError)


def test_errors_survive_pickling() -> None:
    exc = TavusNotFound("Conversation not found", status=404, method="GET", path="/conversations/c1")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is TavusNotFound
    assert (back.status, back.method, back.path, back.message) == (
        404,
        "GET",
        "/conversations/c1",
        "Conversation not found",
    )
    assert str(back) == str(exc) == "Tavus GET /conversations/c1: HTTP 404: Conversation not found"


# --- errors that are not retried ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, TavusRejected),
        (401, TavusAuthError),
        (403, TavusAuthError),
        (404, TavusNotFound),
        (422, TavusRejected),
    ],
)
def test_4xx_is_raised_at_once_with_tavus_message(
    client: TavusClient,
    fake_tavus: FakeTavus,
    sleeps: Sleeps,
    status: int,
    cls: type[TavusHTTPError],
) -> None:
    fake_tavus.reject(status=status, message="Invalid replica_id: r-nope", times=3)
    with pytest.raises(cls) as info:
        client.get_persona("p1")
    assert info.value.status == status
    assert info.value.message == "Invalid replica_id: r-nope"
    assert "Invalid replica_id: r-nope" in str(info.value)
    assert fake_tavus.request_count == 1
    assert sleeps.calls == []


def test_wrong_key_is_an_auth_error(fake_tavus: FakeTavus, sleeps: Sleeps) -> None:
    client = TavusClient("not-the-key", fake_tavus.url, sleep=sleeps)
    with pytest.raises(TavusAuthError) as info:
        client.list_personas()
    assert info.value.status == 401
    assert info.value.message == "Invalid access token"
    assert fake_tavus.request_count == 1


def test_message_from_the_message_field(client: TavusClient, fake_tavus: FakeTavus) -> None:
    fake_tavus.reject(status=400, message="persona_name is too long", field="message")
    with pytest.raises(TavusRejected, match="persona_name is too long"):
        client.create_persona("x")


def test_message_from_a_plain_text_body(client: TavusClient, fake_tavus: FakeTavus) -> None:
    fake_tavus.fail_text("<html>upstream\n  connect error</html>", status=502, times=1)
    client.max_retries = 0
    with pytest.raises(TavusServerError) as info:
        client.list_personas()
    assert info.value.message == "<html>upstream connect error</html>"
    assert info.value.status == 502


def test_tavus_validation_error_from_the_fake(client: TavusClient, fake_tavus: FakeTavus) -> None:
    with pytest.raises(TavusRejected, match="Invalid persona_id"):
        client.create_conversation("p-unknown", replica_id="r1")
    assert fake_tavus.request_count == 1


# --- retries ------------------------------------------------------------------------------------


def test_429_is_retried_after_retry_after(client: TavusClient, fake_tavus: FakeTavus, sleeps: Sleeps) -> None:
    fake_tavus.rate_limit(times=2, retry_after="3")
    assert client.list_personas()["data"] == []
    assert fake_tavus.request_count == 3
    assert sleeps.calls == [3.0, 3.0]


def test_retry_after_is_capped_by_backoff_max(fake_tavus: FakeTavus, sleeps: Sleeps) -> None:
    client = TavusClient(fake_tavus.api_key, fake_tavus.url, backoff_max=5.0, sleep=sleeps)
    fake_tavus.rate_limit(times=1, retry_after="120")
    client.list_personas()
    assert sleeps.calls == [5.0]


def test_429_without_retry_after_backs_off_exponentially(fake_tavus: FakeTavus, sleeps: Sleeps) -> None:
    client = TavusClient(fake_tavus.api_key, fake_tavus.url, backoff_base=1.0, backoff_max=3.0, sleep=sleeps)
    fake_tavus.rate_limit(times=3, retry_after=None)
    client.list_personas()
    first, second, third = sleeps.calls
    assert 0.5 <= first <= 1.0
    assert 1.0 <= second <= 2.0
    assert 1.5 <= third <= 3.0  # 4 s, capped at 3


def test_429_on_every_attempt(fake_tavus: FakeTavus, sleeps: Sleeps) -> None:
    client = TavusClient(fake_tavus.api_key, fake_tavus.url, max_retries=2, sleep=sleeps)
    fake_tavus.rate_limit(times=10, retry_after="1", message="Too many conversations")
    with pytest.raises(TavusRateLimited) as info:
        client.get_conversation("c1")
    assert info.value.status == 429
    assert info.value.message == "Too many conversations"
    assert fake_tavus.request_count == 3
    assert sleeps.calls == [1.0, 1.0]


def test_429_on_create_is_retried(client: TavusClient, fake_tavus: FakeTavus, sleeps: Sleeps) -> None:
    fake_tavus.rate_limit(times=1, retry_after="2")
    client.create_persona("After the limit")
    assert len(fake_tavus.requests("POST")) == 2
    assert len(fake_tavus.state.personas) == 1
    assert sleeps.calls == [2.0]


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_retried(client: TavusClient, fake_tavus: FakeTavus, sleeps: Sleeps, status: int) -> None:
    persona = fake_tavus.add_persona("P")
    fake_tavus.fail(times=2, status=status)
    assert client.get_persona(persona["persona_id"])["persona_name"] == "P"
    assert fake_tavus.request_count == 3
    assert len(sleeps.calls) == 2
    assert 0.25 <= sleeps.calls[0] <= 0.5
    assert 0.5 <= sleeps.calls[1] <= 1.0


def test_5xx_on_every_attempt(fake_tavus: FakeTavus, sleeps: Sleeps) -> None:
    client = TavusClient(fake_tavus.api_key, fake_tavus.url, max_retries=3, sleep=sleeps)
    fake_tavus.fail(times=10, status=500, message="Internal error while fetching conversation")
    with pytest.raises(TavusServerError) as info:
        client.get_conversation("c1")
    assert info.value.status == 500
    assert "Internal error while fetching conversation" in str(info.value)
    assert fake_tavus.request_count == 4
    assert len(sleeps.calls) == 3


def test_5xx_on_create_is_not_retried(client: TavusClient, fake_tavus: FakeTavus, sleeps: Sleeps) -> None:
    persona = fake_tavus.add_persona(default_replica_id="r1")
    fake_tavus.fail(times=1, status=503)
    with pytest.raises(TavusServerError):
        client.create_conversation(persona["persona_id"])
    assert fake_tavus.request_count == 1
    assert sleeps.calls == []


def test_end_is_retried_on_5xx(client: TavusClient, fake_tavus: FakeTavus, sleeps: Sleeps) -> None:
    persona = fake_tavus.add_persona(default_replica_id="r1")
    cid = client.create_conversation(persona["persona_id"])["conversation_id"]
    fake_tavus.fail(times=1, status=503)
    client.end_conversation(cid)
    assert len(fake_tavus.requests("POST", f"/v2/conversations/{cid}/end")) == 2
    assert fake_tavus.state.conversations[cid]["status"] == "ended"


def test_connection_refused_is_retried_then_unavailable(sleeps: Sleeps) -> None:
    client = TavusClient("k", unused_url(), max_retries=3, sleep=sleeps)
    with pytest.raises(TavusUnavailable) as info:
        client.list_personas()
    assert info.value.status is None
    assert "could not connect after 4 attempt(s)" in str(info.value)
    assert len(sleeps.calls) == 3
    assert isinstance(info.value, RetryableError)


def test_connection_refused_on_create_is_retried(sleeps: Sleeps) -> None:
    client = TavusClient("k", unused_url(), max_retries=2, sleep=sleeps)
    with pytest.raises(TavusUnavailable):
        client.create_persona("never sent")
    assert len(sleeps.calls) == 2


def test_dropped_connection_on_get_is_retried(
    client: TavusClient, fake_tavus: FakeTavus, sleeps: Sleeps
) -> None:
    fake_tavus.drop(times=2)
    assert client.list_personas()["total_count"] == 0
    assert fake_tavus.request_count == 3
    assert len(sleeps.calls) == 2


def test_lost_answer_on_create_is_not_retried(
    client: TavusClient, fake_tavus: FakeTavus, sleeps: Sleeps
) -> None:
    """Tavus made the conversation but the answer never came: retrying would make a second one."""
    persona = fake_tavus.add_persona(default_replica_id="r1")
    fake_tavus.lose_answer(times=1)
    with pytest.raises(TavusUnavailable):
        client.create_conversation(persona["persona_id"])
    assert len(fake_tavus.requests("POST", "/v2/conversations")) == 1
    assert len(fake_tavus.state.conversations) == 1
    assert sleeps.calls == []


def test_delete_whose_answer_was_lost_succeeds_on_retry(
    client: TavusClient,
    fake_tavus: FakeTavus,
    sleeps: Sleeps,
) -> None:
    persona = fake_tavus.add_persona(default_replica_id="r1")
    cid = client.create_conversation(persona["persona_id"])["conversation_id"]
    fake_tavus.lose_answer(times=1)
    client.delete_conversation(cid)  # the retry's 404 means the first one landed
    assert len(fake_tavus.requests("DELETE")) == 2
    assert cid not in fake_tavus.state.conversations


def test_delete_unknown_is_not_found(client: TavusClient, fake_tavus: FakeTavus) -> None:
    with pytest.raises(TavusNotFound):
        client.delete_conversation("c-missing")
    assert fake_tavus.request_count == 1


def test_timeout_is_retried_for_reads(fake_tavus: FakeTavus, sleeps: Sleeps) -> None:
    client = TavusClient(fake_tavus.api_key, fake_tavus.url, timeout=0.2, max_retries=1, sleep=sleeps)
    fake_tavus.slow(seconds=30, times=1)
    assert client.list_personas()["data"] == []
    assert fake_tavus.request_count == 2
    assert len(sleeps.calls) == 1


def test_timeout_on_every_attempt(fake_tavus: FakeTavus, sleeps: Sleeps) -> None:
    client = TavusClient(fake_tavus.api_key, fake_tavus.url, timeout=0.2, max_retries=0, sleep=sleeps)
    fake_tavus.slow(seconds=30, times=1)
    with pytest.raises(TavusUnavailable, match="timed out after 1 attempt"):
        client.get_conversation("c1")
    assert fake_tavus.request_count == 1


def test_timeout_on_create_is_not_retried(fake_tavus: FakeTavus, sleeps: Sleeps) -> None:
    client = TavusClient(fake_tavus.api_key, fake_tavus.url, timeout=0.2, max_retries=3, sleep=sleeps)
    fake_tavus.slow(seconds=30, times=1)
    with pytest.raises(TavusUnavailable, match="timed out"):
        client.create_persona("slow")
    assert fake_tavus.request_count == 1
    assert sleeps.calls == []


def test_parse_retry_after() -> None:
    assert _parse_retry_after(None) is None
    assert _parse_retry_after("7") == 7.0
    assert _parse_retry_after(" 1.5 ") == 1.5
    assert _parse_retry_after("-3") == 0.0
    assert _parse_retry_after("soon") is None
    assert _parse_retry_after("nan") is None
    assert _parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


# --- the key stays secret -----------------------------------------------------------------------


def test_key_echoed_in_an_error_body_is_scrubbed(
    client: TavusClient,
    fake_tavus: FakeTavus,
    tavus_log: pytest.LogCaptureFixture,
) -> None:
    fake_tavus.echo_headers(status=400)
    with pytest.raises(TavusRejected) as info:
        client.create_persona("leaky")
    key = fake_tavus.api_key
    assert fake_tavus.requests()[0].headers["x-api-key"] == key  # the body did carry the key
    assert "[redacted]" in info.value.message
    for text in _strings_of(info.value):
        assert key not in text
    assert key not in tavus_log.text
    assert all(key not in repr(r.__dict__) for r in tavus_log.records)


def test_key_echoed_in_a_server_error_after_retries_is_scrubbed(
    fake_tavus: FakeTavus, sleeps: Sleeps
) -> None:
    client = TavusClient(fake_tavus.api_key, fake_tavus.url, max_retries=1, sleep=sleeps)
    fake_tavus.echo_headers(status=500, times=2)
    with pytest.raises(TavusServerError) as info:
        client.list_personas()
    for text in _strings_of(info.value):
        assert fake_tavus.api_key not in text
    assert "[redacted]" in info.value.message


def test_key_never_in_errors_or_logs_of_any_failure(
    fake_tavus: FakeTavus,
    sleeps: Sleeps,
    tavus_log: pytest.LogCaptureFixture,
) -> None:
    key = fake_tavus.api_key
    failures: list[BaseException] = []
    client = TavusClient(SecretStr(key), fake_tavus.url, timeout=0.2, max_retries=1, sleep=sleeps)
    refused = TavusClient(key, unused_url(), max_retries=1, sleep=sleeps)
    fake_tavus.rate_limit(times=2)
    fake_tavus.fail(times=2)
    fake_tavus.slow(seconds=30, times=2)
    fake_tavus.reject(status=401, message="Invalid access token")
    for call in (
        client.list_personas,
        client.list_personas,
        client.list_personas,
        lambda: client.get_persona("p1"),
        refused.list_personas,
    ):
        with pytest.raises(TavusError) as info:
            call()
        failures.append(info.value)
    with pytest.raises(TavusConfigError) as config_info:
        TavusClient(key, "ftp://nowhere")
    failures.append(config_info.value)

    for exc in failures:
        for text in _strings_of(exc):
            assert key not in text
    assert tavus_log.records
    assert key not in tavus_log.text
    assert key not in repr(client) and key not in repr(refused)


def test_one_log_line_per_attempt_without_bodies(
    client: TavusClient,
    fake_tavus: FakeTavus,
    tavus_log: pytest.LogCaptureFixture,
) -> None:
    fake_tavus.rate_limit(times=1, retry_after="0")
    client.create_persona("Narrator", system_prompt="a very private prompt")
    lines = [r.getMessage() for r in tavus_log.records if r.name == "echoq.tavus"]
    assert len(lines) == 2
    assert "method=POST" in lines[0] and "path=/personas" in lines[0]
    assert "status=429" in lines[0] and "attempt=1" in lines[0] and "duration_ms=" in lines[0]
    assert "status=200" in lines[1] and "attempt=2" in lines[1]
    assert "private prompt" not in tavus_log.text
    assert "Narrator" not in tavus_log.text


# -- concurrency limit and create options ----------------------------------------------------------


def test_the_concurrency_limit_on_create_is_waited_out(
    client: TavusClient, fake_tavus: FakeTavus, sleeps: Sleeps
) -> None:
    persona = fake_tavus.add_persona(default_replica_id="r1")
    fake_tavus.concurrency_limit(times=2)
    conv = client.create_conversation(persona["persona_id"])
    assert conv["status"] == "active"
    assert len(fake_tavus.requests("POST", "/v2/conversations")) == 3
    assert len(sleeps.calls) == 2 and all(s > 0 for s in sleeps.calls)  # backed off before each retry


def test_a_concurrency_limit_that_persists_is_its_own_retryable_error(fake_tavus: FakeTavus, sleeps: Sleeps) -> None:
    client = TavusClient(fake_tavus.api_key, fake_tavus.url, max_retries=2, sleep=sleeps)
    persona = fake_tavus.add_persona(default_replica_id="r1")
    fake_tavus.concurrency_limit(times=10)
    with pytest.raises(TavusConcurrencyLimit, match="maximum concurrent conversations") as info:
        client.create_conversation(persona["persona_id"])
    assert isinstance(info.value, RetryableError) and not isinstance(info.value, PermanentError)
    assert info.value.status == 400
    assert len(fake_tavus.requests("POST", "/v2/conversations")) == 3
    assert fake_tavus.state.conversations == {}


def test_any_other_400_is_still_refused_at_once(client: TavusClient, fake_tavus: FakeTavus, sleeps: Sleeps) -> None:
    fake_tavus.reject(400, "Invalid persona_id")
    with pytest.raises(TavusRejected):
        client.create_conversation("p-none")
    assert sleeps.calls == []


def test_create_options_are_sent_as_tavus_names_them(client: TavusClient, fake_tavus: FakeTavus) -> None:
    persona = fake_tavus.add_persona(default_replica_id="r1")
    conv = client.create_conversation(persona["persona_id"], require_auth=True, test_mode=True, audio_only=True,
                                      custom_greeting="Hi!", conversational_context="A demo.")
    (request,) = fake_tavus.requests("POST", "/v2/conversations")
    assert request.body == {"persona_id": persona["persona_id"], "require_auth": True, "test_mode": True,
                            "audio_only": True, "custom_greeting": "Hi!", "conversational_context": "A demo."}
    assert conv["meeting_token"].startswith("mtk-")  # a private room's token comes back


@pytest.mark.parametrize("field", ["conversation_name", "custom_greeting", "conversational_context"])
def test_text_sent_to_tavus_follows_the_text_rule_and_nothing_is_sent(
    client: TavusClient, fake_tavus: FakeTavus, field: str
) -> None:
    from worker.errors import InvalidInput

    with pytest.raises(InvalidInput, match=f"^{field} contains the control character U\\+0000 at index 2"):
        client.create_conversation("p1", **{field: "hi\x00there"})
    with pytest.raises(InvalidInput, match="^persona_name contains the control character U\\+001B at index 4"):
        client.create_persona("Bob \x1b[1m")
    assert fake_tavus.request_count == 0
    # tab, line feed and carriage return are ordinary whitespace and go through
    persona = fake_tavus.add_persona(default_replica_id="r1")["persona_id"]
    answer = client.create_conversation(persona, **{field: "line one\r\n\tline two"})
    assert fake_tavus.requests("POST")[0].body[field] == "line one\r\n\tline two" and answer["conversation_id"]
