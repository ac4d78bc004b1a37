"""``echoq tavus`` against the fake Tavus server: output, --json, exit codes, and the key."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.cli.tavus import client_from_env, register
from tests.fake_tavus import (
    FakeTavus,
    fake_tavus_fixture,  # noqa: F401  (the fake_tavus fixture)
    unused_url,
)
from worker.settings import get_settings


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_tavus: FakeTavus) -> Iterator[FakeTavus]:
    """TAVUS_API_KEY and ECHOQ_TAVUS_BASE_URL point at the fake; no stray .env is read."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ECHOQ_TAVUS_API_KEY", raising=False)
    monkeypatch.setenv("TAVUS_API_KEY", fake_tavus.api_key)
    monkeypatch.setenv("ECHOQ_TAVUS_BASE_URL", fake_tavus.url)
    get_settings.cache_clear()
    yield fake_tavus
    get_settings.cache_clear()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="echoq")
    sub = p.add_subparsers(dest="command", required=True)
    register(sub)
    return p


def run(*argv: str) -> int:
    args = parser().parse_args(["tavus", *argv])
    return int(args.func(args))


def out_err(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    captured = capsys.readouterr()
    return captured.out, captured.err


# --- personas -----------------------------------------------------------------------------------


def test_persona_create(env: FakeTavus, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run("persona", "create", "Narrator", "--system-prompt", "read it", "--default-replica-id", "r1") == 0
    )
    out, err = out_err(capsys)
    (pid,) = env.state.personas
    assert out.splitlines()[0] == f"persona_id: {pid}"
    assert "persona_name: Narrator" in out
    assert err == ""
    assert env.requests("POST")[0].body == {
        "persona_name": "Narrator",
        "pipeline_mode": "echo",
        "system_prompt": "read it",
        "default_replica_id": "r1",
    }


def test_persona_create_json(env: FakeTavus, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("persona", "create", "Narrator", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["persona_id"] in env.state.personas
    assert data["persona_name"] == "Narrator"


def test_persona_list(env: FakeTavus, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("persona", "list") == 0
    assert capsys.readouterr().out.strip() == "no personas"

    a = env.add_persona("First")
    b = env.add_persona("Second")
    assert run("persona", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{a['persona_id']}\techo\tFirst", f"{b['persona_id']}\techo\tSecond"]

    assert run("persona", "list", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_count"] == 2
    assert [p["persona_name"] for p in data["data"]] == ["First", "Second"]


def test_persona_get(env: FakeTavus, capsys: pytest.CaptureFixture[str]) -> None:
    persona = env.add_persona("Host", layers={"llm": {"model": "none"}})
    assert run("persona", "get", persona["persona_id"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:3] == [
        f"persona_id: {persona['persona_id']}",
        "persona_name: Host",
        "pipeline_mode: echo",
    ]
    assert 'layers: {"llm": {"model": "none"}}' in out

    assert run("persona", "get", persona["persona_id"], "--json") == 0
    assert json.loads(capsys.readouterr().out) == persona


def test_persona_get_unknown_exits_3(env: FakeTavus, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("persona", "get", "p-missing") == 3
    out, err = out_err(capsys)
    assert out == ""
    assert "Persona not found" in err
    assert "HTTP 404" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# --- conversations ------------------------------------------------------------------------------


def test_conversation_create(env: FakeTavus, capsys: pytest.CaptureFixture[str]) -> None:
    persona = env.add_persona("Host")
    code = run(
        "conversation",
        "create",
        "--persona-id",
        persona["persona_id"],
        "--replica-id",
        "r1",
        "--name",
        "Show",
        "--callback-url",
        "https://example.test/hook",
        "--properties",
        '{"max_call_duration": 100, "language": "english"}',
        "--max-call-duration",
        "300",
        "--participant-left-timeout",
        "10",
        "--participant-absent-timeout",
        "20",
    )
    assert code == 0
    out = capsys.readouterr().out
    (cid,) = env.state.conversations
    assert out.splitlines()[:3] == [
        f"conversation_id: {cid}",
        "status: active",
        f"conversation_url: https://tavus.daily.co/{cid}",
    ]
    assert env.requests("POST", "/v2/conversations")[0].body == {
        "persona_id": persona["persona_id"],
        "replica_id": "r1",
        "conversation_name": "Show",
        "callback_url": "https://example.test/hook",
        "properties": {
            "max_call_duration": 300,
            "language": "english",
            "participant_left_timeout": 10,
            "participant_absent_timeout": 20,
        },
    }


def test_conversation_create_json(env: FakeTavus, capsys: pytest.CaptureFixture[str]) -> None:
    persona = env.add_persona("Host", default_replica_id="r1")
    assert run("conversation", "create", "--persona-id", persona["persona_id"], "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "active"
    assert data["conversation_url"] == f"https://tavus.daily.co/{data['conversation_id']}"
    assert env.requests("POST")[0].body == {"persona_id": persona["persona_id"]}


@pytest.mark.parametrize("properties", ["{not json", "[1, 2]"])
def test_conversation_create_bad_properties_exits_2(
    env: FakeTavus, capsys: pytest.CaptureFixture[str], properties: str
) -> None:
    assert run("conversation", "create", "--persona-id", "p1", "--properties", properties) == 2
    assert "--properties" in capsys.readouterr().err
    assert env.request_count == 0


def test_conversation_create_refused_exits_3(env: FakeTavus, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("conversation", "create", "--persona-id", "p-unknown", "--replica-id", "r1") == 3
    assert "Invalid persona_id" in capsys.readouterr().err


def test_conversation_get_end_delete(env: FakeTavus, capsys: pytest.CaptureFixture[str]) -> None:
    persona = env.add_persona("Host", default_replica_id="r1")
    assert run("conversation", "create", "--persona-id", persona["persona_id"], "--json") == 0
    cid = json.loads(capsys.readouterr().out)["conversation_id"]

    assert run("conversation", "get", cid) == 0
    out = capsys.readouterr().out
    assert "status: active" in out
    assert f"persona_id: {persona['persona_id']}" in out

    assert run("conversation", "end", cid) == 0
    assert capsys.readouterr().out.strip() == f"ended {cid}"
    assert run("conversation", "get", cid, "--json") == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ended"

    assert run("conversation", "end", cid, "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"conversation_id": cid, "status": "ended"}

    assert run("conversation", "delete", cid, "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"conversation_id": cid, "deleted": True}
    assert cid not in env.state.conversations

    assert run("conversation", "delete", cid) == 3
    out, err = out_err(capsys)
    assert out == ""
    assert "Conversation not found" in err


def test_conversation_delete_human(env: FakeTavus, capsys: pytest.CaptureFixture[str]) -> None:
    persona = env.add_persona("Host", default_replica_id="r1")
    assert run("conversation", "create", "--persona-id", persona["persona_id"], "--json") == 0
    cid = json.loads(capsys.readouterr().out)["conversation_id"]
    assert run("conversation", "delete", cid) == 0
    assert capsys.readouterr().out.strip() == f"deleted {cid}"


# --- exit codes and errors ----------------------------------------------------------------------


def test_missing_key_exits_2(
    env: FakeTavus, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TAVUS_API_KEY")
    get_settings.cache_clear()
    assert run("persona", "list") == 2
    out, err = out_err(capsys)
    assert out == ""
    assert "TAVUS_API_KEY" in err
    assert env.request_count == 0


def test_wrong_key_exits_3_without_showing_it(
    env: FakeTavus, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TAVUS_API_KEY", "tvs-wrong-key-0000")
    get_settings.cache_clear()
    assert run("persona", "list") == 3
    out, err = out_err(capsys)
    assert "Invalid access token" in err
    assert "tvs-wrong-key-0000" not in out + err


def test_key_echoed_by_tavus_is_not_printed(env: FakeTavus, capsys: pytest.CaptureFixture[str]) -> None:
    env.echo_headers(status=400)
    assert run("persona", "create", "Leaky", "--json") == 3
    out, err = out_err(capsys)
    assert "[redacted]" in err
    assert env.api_key not in out + err


@pytest.mark.parametrize(
    "fault",
    [
        lambda t: t.fail(times=5, status=503),
        lambda t: t.fail(times=5, status=500),
        lambda t: t.rate_limit(times=5, retry_after="0"),
    ],
    ids=["503", "500", "429"],
)
def test_unavailable_or_rate_limited_exits_4(
    env: FakeTavus, capsys: pytest.CaptureFixture[str], fault: object
) -> None:
    fault(env)  # type: ignore[operator]
    assert run("persona", "list", "--retries", "0") == 4
    out, err = out_err(capsys)
    assert out == ""
    assert err.startswith("echoq tavus: Tavus GET /personas: HTTP ")
    assert "Traceback" not in err
    assert env.request_count == 1


def test_connection_refused_exits_4(
    env: FakeTavus, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ECHOQ_TAVUS_BASE_URL", unused_url())
    get_settings.cache_clear()
    assert run("conversation", "get", "c1", "--retries", "0") == 4
    assert "could not connect" in capsys.readouterr().err


def test_timeout_exits_4(env: FakeTavus, capsys: pytest.CaptureFixture[str]) -> None:
    env.slow(seconds=30)
    assert run("conversation", "get", "c1", "--retries", "0", "--timeout", "0.2") == 4
    assert "timed out" in capsys.readouterr().err


def test_retries_option_reaches_the_client(env: FakeTavus, capsys: pytest.CaptureFixture[str]) -> None:
    env.rate_limit(times=1, retry_after="0")
    assert run("persona", "list", "--retries", "1") == 0
    assert env.request_count == 2


def test_bad_base_url_exits_2(
    env: FakeTavus, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ECHOQ_TAVUS_BASE_URL", "tavusapi.com/v2")
    get_settings.cache_clear()
    assert run("persona", "list") == 2
    assert "base URL" in capsys.readouterr().err


# --- the parser ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["tavus", "--help"],
        ["tavus", "persona", "--help"],
        ["tavus", "conversation", "--help"],
        *[["tavus", "persona", c, "--help"] for c in ("create", "list", "get")],
        *[["tavus", "conversation", c, "--help"] for c in ("create", "get", "end", "delete")],
    ],
)
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parser().parse_args(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: echoq tavus")
    assert "Exit codes" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["tavus"],
        ["tavus", "persona"],
        ["tavus", "persona", "get"],
        ["tavus", "conversation", "create"],
        ["tavus", "conversation", "create", "--persona-id", "p", "--max-call-duration", "-1"],
        ["tavus", "persona", "list", "--timeout", "0"],
        ["tavus", "conversation", "launch", "c1"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parser().parse_args(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_every_command_has_a_handler() -> None:
    p = parser()
    for argv in (
        ["persona", "create", "n"],
        ["persona", "list"],
        ["persona", "get", "p"],
        ["conversation", "create", "--persona-id", "p"],
        ["conversation", "get", "c"],
        ["conversation", "end", "c"],
        ["conversation", "delete", "c"],
    ):
        args = p.parse_args(["tavus", *argv])
        assert callable(args.func)
        assert args.json is False


def test_client_from_env(env: FakeTavus) -> None:
    client = client_from_env(max_retries=1)
    assert client.base_url == env.url
    assert client.max_retries == 1
    assert client.list_personas()["data"] == []
    assert env.requests()[0].headers["x-api-key"] == env.api_key


def test_echoq_main_runs_tavus(env: FakeTavus, capsys: pytest.CaptureFixture[str]) -> None:
    from producer.cli import main

    env.add_persona("Via main")
    assert main(["tavus", "persona", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"][0]["persona_name"] == "Via main"


def test_conversation_create_private_never_prints_the_meeting_token(
    env: FakeTavus, capsys: pytest.CaptureFixture[str]
) -> None:
    persona = env.add_persona("P", default_replica_id="r1")
    assert run("conversation", "create", "--persona-id", persona["persona_id"], "--private",
               "--audio-only", "--greeting", "Hello!", "--conversation-context", "A test.", "--json") == 0
    out, err = out_err(capsys)
    (conv,) = env.state.conversations.values()
    assert conv["meeting_token"] not in out + err
    assert "meeting_token" not in json.loads(out)
    assert (conv["require_auth"], conv["audio_only"], conv["custom_greeting"], conv["conversational_context"]) == (
        True, True, "Hello!", "A test.")


def test_persona_create_with_the_microphone_layers_from_the_setting(
    env: FakeTavus, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("persona", "create", "Mic", "--microphone", "--json") == 0
    (request,) = env.requests("POST", "/v2/personas")
    assert request.body["layers"] == {"transport": {"input_settings": {"microphone": "enabled"}}}


@pytest.mark.parametrize("argv, field", [
    (("conversation", "create", "--persona-id", "p1", "--name", "demo\x07"), "conversation_name"),
    (("conversation", "create", "--persona-id", "p1", "--greeting", "hi\x1b[2J"), "custom_greeting"),
    (("conversation", "create", "--persona-id", "p1", "--conversation-context", "a\x7fb"), "conversational_context"),
    (("persona", "create", "Nar\x01rator"), "persona_name"),
])
def test_text_that_breaks_the_text_rule_exits_2_before_any_request(
    env: FakeTavus, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], field: str
) -> None:
    assert run(*argv) == 2
    _out, err = out_err(capsys)
    assert err.startswith(f"echoq tavus: {field} contains the control character U+") and "index" in err
    assert env.request_count == 0


def test_start_refuses_a_greeting_that_breaks_the_text_rule_before_any_request(
    env: FakeTavus, capsys: pytest.CaptureFixture[str]
) -> None:
    from producer.cli.main import main

    assert main(["start", "--persona", "p1", "--greeting", "hi\x85"]) == 2
    assert "custom_greeting contains the control character U+0085 at index 2" in capsys.readouterr().err
    assert env.request_count == 0
