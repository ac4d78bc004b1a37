"""The bad-input corpus against one worker and the simulator, through the client, the API and the CLI.

For every case: the expected error (or, for media that decodes, the expected playback), nothing
enqueued, the worker still alive, and the next good utterance on the same conversation spoken —
once, after everything spoken before it. Media whose header passes the producer's check but
which fails to decode fails its utterance in the worker instead: the record says why, no
``done`` goes out for it, and what was sent of it is cut with ``conversation.interrupt``.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from tests.badinput import MEDIA_NAMES, media_cases
from tests.conftest import TEST_REDIS_URL, _redis_or_skip
from tests.hostile_server import HostileServer, hostile_server
from tests.integration.conftest import Workers, running_simulator, wire
from worker import keys
from worker.errors import AudioError, EchoqError, InvalidInput, TextTooLong, UnsafeURL
from worker.settings import Settings

pytestmark = pytest.mark.redis

CID = "corpus"
ROOM = "corpus-room"
TOKEN = "corpus-api-token-5e0b7a"
MAX_SECONDS = 1.5
FETCH_DEADLINE_S = 1.5


@dataclass
class Bench:
    redis: redis.Redis
    client: Any
    api: TestClient
    workers: Workers
    trusted: HostileServer  # on 127.0.0.2, which the allow-list names
    internal: HostileServer  # on 127.0.0.1, which it does not
    tmp: Path
    spoken: list[str] = field(default_factory=list)

    def enqueued(self) -> tuple[int, int]:
        return self.redis.llen(keys.conv_log(CID)), len(self.redis.keys("echoq:blob:*"))


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    """One worker, the simulator, a conversation, the API in process and two local HTTP servers."""
    from producer.api import create_app
    from producer.client import EchoqClient

    r = _redis_or_skip()
    r.flushdb()
    tmp = tmp_path_factory.mktemp("corpus")
    settings = Settings(max_audio_seconds=MAX_SECONDS, max_audio_bytes=512 * 1024, fetch_timeout_s=FETCH_DEADLINE_S,
                        fetch_allow_hosts="127.0.0.2")
    client = EchoqClient(settings=settings, redis_client=r)
    workers = Workers(tmp, r)
    with running_simulator(r, tmp / "sim"), hostile_server("127.0.0.2") as trusted, hostile_server() as internal:
        workers.start(1, ECHOQ_MAX_AUDIO_SECONDS=str(MAX_SECONDS))
        client.open(CID, f"loopback://{ROOM}")
        api = TestClient(create_app(tokens=[TOKEN], client=client, settings=settings),
                         headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            yield Bench(r, client, api, workers, trusted, internal, tmp)
        finally:
            api.close()
            workers.stop_all()
    r.flushdb()


def then_good_utterance_is_spoken(bench: Bench, name: str) -> None:
    """The worker is alive and the next good utterance is spoken once, after all the earlier ones."""
    assert bench.workers.started[0].proc.poll() is None, bench.workers.started[0].log()[-2000:]
    inference_id = f"good-{len(bench.spoken)}"
    uid = bench.client.say(CID, f"After {name}.", inference_id=inference_id)
    assert bench.client.wait(uid, timeout=30)["state"] in ("sent", "spoken")
    bench.spoken.append(inference_id)
    texts = [m["properties"]["inference_id"] for m in wire(bench.redis, ROOM)
             if m.get("properties", {}).get("modality") == "text"]
    assert texts == bench.spoken  # nothing lost, nothing twice, order kept


def refused(bench: Bench, name: str, attempt: Callable[[], Any], check: Callable[[Any], None]) -> None:
    before = bench.enqueued()
    check(attempt())
    assert bench.enqueued() == before, f"{name} enqueued something"
    then_good_utterance_is_spoken(bench, name)


def raises(kind: type[Exception], pattern: str, call: Callable[[], Any]) -> Callable[[], Any]:
    def attempt() -> Exception:
        with pytest.raises(kind, match=pattern) as info:
            call()
        return info.value
    return attempt


def post_json(bench: Bench, path: str, body: Any) -> httpx.Response:
    """POST ``body`` as ASCII JSON, so a lone surrogate travels as the escape ``\\ud800``."""
    return bench.api.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def unprocessable(loc: list[Any], pattern: str = "") -> Callable[[httpx.Response], None]:
    def check(r: httpx.Response) -> None:
        assert r.status_code == 422, r.text
        first = r.json()["detail"][0]
        assert first["loc"][: len(loc)] == loc, r.text
        assert re.search(pattern, first["msg"]), r.text
    return check


# --- media --------------------------------------------------------------------------------------

_MEDIA: dict[str, tuple[bytes, str | None, str]] = {}


def _media(tmp: Path) -> dict[str, tuple[bytes, str | None, str]]:
    if not _MEDIA:
        _MEDIA.update({n: (d, f, e) for n, d, f, e in media_cases(tmp, MAX_SECONDS)})
        assert list(_MEDIA) == MEDIA_NAMES
    return _MEDIA



@pytest.mark.parametrize("name", MEDIA_NAMES)
def test_media(bench: Bench, name: str) -> None:
    data, fmt, expect = _media(bench.tmp)[name]
    if expect.startswith("refused:"):
        refused(bench, name, raises(AudioError, expect.removeprefix("refused:"),
                                    lambda: bench.client.play(CID, data, format=fmt)), lambda _e: None)
        return
    uid = bench.client.play(CID, data, format=fmt, inference_id=f"media-{name}")
    rec = bench.client.wait(uid, timeout=30)
    if expect.startswith("failed:"):
        then_it_failed_in_the_worker(bench, name, rec, expect.removeprefix("failed:"))
        return
    assert rec["state"] in ("sent", "spoken"), rec
    chunks = [m for m in wire(bench.redis, ROOM) if m.get("properties", {}).get("inference_id") == f"media-{name}"]
    assert chunks and [m["properties"]["done"] for m in chunks] == [False] * (len(chunks) - 1) + [True]
    assert sum(len(base64.b64decode(m["properties"]["audio"])) for m in chunks) > 0
    if expect == "noted":
        assert re.match(r"decoder stopped early: \d+\.\d\d s decoded", rec["decode_note"]), rec
    else:
        assert "decode_note" not in rec, rec
    then_good_utterance_is_spoken(bench, name)


def then_it_failed_in_the_worker(bench: Bench, name: str, rec: dict[str, Any], reason: str) -> None:
    """Accepted at enqueue, failed when decoded: the record says why, nothing of it ends with
    ``done``, and if part of it went out the room hears ``conversation.interrupt`` right after."""
    assert rec["state"] == "failed" and re.search(reason, rec["error"]), rec
    messages = wire(bench.redis, ROOM)
    mine = [i for i, m in enumerate(messages) if m.get("properties", {}).get("inference_id") == f"media-{name}"]
    assert not any(messages[i]["properties"]["done"] for i in mine)
    if "longer than the limit" in reason:
        assert mine, "the audio up to the limit went out before decoding found it too long"
    if mine:
        assert "cut mid-utterance: conversation.interrupt sent" in rec["error"], rec
        assert messages[mine[-1] + 1]["event_type"] == "conversation.interrupt"
        assert mine == list(range(mine[0], mine[-1] + 1))  # nothing else interleaved with it
    then_good_utterance_is_spoken(bench, name)


# --- text and ids -------------------------------------------------------------------------------

CONTROL_TEXTS = {"nul": "a\x00b", "escape": "red \x1b[31m text", "bell": "ding\x07", "c1-next-line": "one\x85two",
                 "delete": "oops\x7f", "lone-surrogate": "half \ud800 pair"}
BAD_IDS = ["a:b", "../etc", "echoq:conv:x", "x*", "a b", "x\r\ny", "q{1}", "", "x" * 129, "ü"]


@pytest.mark.parametrize("kind", sorted(CONTROL_TEXTS))
def test_control_characters_in_text(bench: Bench, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    from producer.cli.main import main

    text = CONTROL_TEXTS[kind]
    # pydantic itself refuses a lone surrogate in JSON as not a unicode string: a 422 on the field too
    why = "control character|lone surrogate|unicode string"
    refused(bench, kind, raises(InvalidInput, r"(control character|lone surrogate) U\+[0-9A-F]{4}",
                                lambda: bench.client.say(CID, text)), lambda _e: None)
    refused(bench, kind, lambda: post_json(bench, f"/v1/conversations/{CID}/utterances", {"text": text}),
            unprocessable(["body", "text"], why))
    refused(bench, kind, lambda: post_json(bench, "/send_text_message", {
        "conversation_id": CID, "properties": {"modality": "text", "text": text, "done": True}}),
        unprocessable(["body", "properties", "text"], why))
    if "\x00" not in text and "\ud800" not in text:  # argv cannot carry these
        refused(bench, kind, lambda: main(["say", CID, text]), lambda code: code == 2 or pytest.fail(str(code)))
        assert "control character" in capsys.readouterr().err


def test_control_characters_in_a_script_and_a_schedule(bench: Bench) -> None:
    from producer.scripting.script import parse_text

    refused(bench, "script", raises(InvalidInput, r"line 1.*control character U\+0000",
                                    lambda: parse_text(f'conversation: {CID}\nlines:\n  - text: "a\\0b"\n')),
            lambda _e: None)
    refused(bench, "schedule", lambda: bench.api.post("/v1/schedules", json={
        "script": {"conversation": CID, "lines": [{"text": "ok"}, {"text": "bad\u001b"}]}, "every": "1h"}),
        unprocessable(["body", "script", "lines", 1], "control character"))
    assert not bench.redis.keys("echoq:schedule*")


def test_text_that_was_not_utf8_on_the_command_line_and_in_a_script_file(
    bench: Bench, capsys: pytest.CaptureFixture[str]
) -> None:
    from producer.cli.main import main

    # Python hands bytes of argv that are not UTF-8 over as lone surrogates (surrogateescape)
    argv_text = b"caf\xe9".decode("utf-8", "surrogateescape")
    refused(bench, "argv", lambda: main(["say", CID, argv_text]), lambda code: code == 2 or pytest.fail(str(code)))
    assert "lone surrogate U+DCE9" in capsys.readouterr().err
    script = bench.tmp / "latin-1.yaml"
    script.write_bytes(f"conversation: {CID}\nlines:\n  - text: \"caf\xe9\"\n".encode("latin-1"))
    refused(bench, "script", lambda: main(["script", "run", str(script)]), lambda code: code == 2 or pytest.fail(str(code)))
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_over_long_text(bench: Bench) -> None:
    refused(bench, "long", raises(TextTooLong, "too long", lambda: bench.client.say(CID, "word " * 2000)), lambda _e: None)
    refused(bench, "long", lambda: bench.api.post(f"/v1/conversations/{CID}/utterances", json={"text": "word " * 2000}),
            unprocessable(["body", "text"], "too long"))


@pytest.mark.parametrize("bad_id", BAD_IDS, ids=[f"id{i}" for i in range(len(BAD_IDS))])
def test_ids_that_could_reach_keys_or_queue_names(bench: Bench, bad_id: str) -> None:
    refused(bench, "id", raises(InvalidInput, "conversation id must be", lambda: bench.client.say(bad_id, "hi")),
            lambda _e: None)
    refused(bench, "id", lambda: bench.api.post("/send_text_message", json={"conversation_id": bad_id, "properties": {
        "modality": "text", "text": "hi"}}), unprocessable(["body", "conversation_id"]))
    if bad_id:
        assert not [k for k in bench.redis.keys("*") if bad_id.encode() in k]
    # Utterance ids may hold ':' (Tavus inference ids do); no key family nests under echoq:utt:<id>.
    if keys.UTTERANCE_ID_RE.match(bad_id):
        return
    if bad_id:  # the client takes an empty utterance id as "make one", an empty inference_id as "the same"
        refused(bench, "id", raises(InvalidInput, "utterance id must be",
                                    lambda: bench.client.say(CID, "hi", utterance_id=bad_id)), lambda _e: None)
        refused(bench, "id", raises(InvalidInput, "inference_id must be",
                                    lambda: bench.client.say(CID, "hi", inference_id=bad_id)), lambda _e: None)
    refused(bench, "id", lambda: bench.api.post(f"/v1/conversations/{CID}/utterances", json={"text": "hi", "id": bad_id}),
            unprocessable(["body", "id"]))


# --- bodies the API cannot read ------------------------------------------------------------------

BAD_BODIES: dict[str, tuple[bytes, list[Any]]] = {
    "latin-1": (b'{"text": "caf\xe9"}', ["body"]),
    "truncated-json": (b'{"text": "hi"', ["body"]),
    "not-json": (b"text=hi", ["body"]),
    "array": (b'["hi"]', ["body"]),
    "text-is-a-number": (b'{"text": 5}', ["body", "text"]),
    "text-is-a-list": (b'{"text": ["hi"]}', ["body", "text"]),
    "channels-is-text": (b'{"audio_base64": "AAAA", "format": "raw", "source_rate": 16000, "channels": "two"}',
                         ["body", "channels"]),
    "sample-rate-44100": (b'{"text": "hi", "sample_rate": 44100}', ["body", "sample_rate"]),
    "base64-garbage": (b'{"audio_base64": "%%%not base64", "format": "raw", "source_rate": 16000}',
                       ["body", "audio_base64"]),
    "unknown-field": (b'{"text": "hi", "voice": "x"}', ["body", "voice"]),
}


@pytest.mark.parametrize("kind", list(BAD_BODIES))
def test_bodies_the_api_cannot_read_are_422_naming_the_field(bench: Bench, kind: str) -> None:
    body, loc = BAD_BODIES[kind]
    refused(bench, kind, lambda: bench.api.post(f"/v1/conversations/{CID}/utterances", content=body,
                                                headers={"Content-Type": "application/json"}), unprocessable(loc))
    if kind in ("latin-1", "truncated-json"):
        refused(bench, kind, lambda: bench.api.post("/send_text_message", content=body,
                                                    headers={"Content-Type": "application/json"}), unprocessable(["body"]))


# --- hostile URLs -------------------------------------------------------------------------------


def _redis_url_port() -> int:
    return int(TEST_REDIS_URL.rsplit(":", 1)[1].split("/")[0])


HOSTILE_URLS: dict[str, tuple[Callable[[Bench], str], type[Exception], str]] = {
    "redis-on-loopback": (lambda b: f"http://127.0.0.1:{_redis_url_port()}/", UnsafeURL, "loopback address"),
    "localhost-name": (lambda b: b.internal.url("/file/a").replace("127.0.0.1", "localhost"), UnsafeURL, "loopback"),
    "metadata-service": (lambda b: "http://169.254.169.254/latest/meta-data/", UnsafeURL, "link-local address"),
    "private-network": (lambda b: "http://10.0.0.1/a.wav", UnsafeURL, "private address"),
    "ipv4-mapped-ipv6": (lambda b: "http://[::ffff:127.0.0.1]:1/a.wav", UnsafeURL, "loopback address"),
    "unspecified": (lambda b: "http://0.0.0.0:1/a.wav", UnsafeURL, "unspecified address"),
    "redirect-to-internal": (lambda b: b.trusted.url("/redirect?to=" + b.internal.url("/file/a")), UnsafeURL,
                             "127.0.0.1, a loopback address"),
    "redirect-to-file": (lambda b: b.trusted.url("/redirect?to=file:///etc/passwd"), UnsafeURL, "only http"),
    "one-byte-per-second": (lambda b: b.trusted.url("/slow"), AudioError, "longer than the deadline"),
    "endless-body": (lambda b: b.trusted.url("/endless"), AudioError, "over the limit"),
}


@pytest.mark.parametrize("kind", list(HOSTILE_URLS))
def test_hostile_urls(bench: Bench, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    from producer.cli.main import main

    make, error, pattern = HOSTILE_URLS[kind]
    url = make(bench)
    bench.internal.files["a"] = b"internal secret"
    refused(bench, kind, raises(error, pattern, lambda: bench.client.play(CID, url)), lambda _e: None)
    refused(bench, kind, lambda: bench.api.post(f"/v1/conversations/{CID}/utterances", json={"audio_url": url}),
            unprocessable(["body", "audio_url"], pattern))
    if error is UnsafeURL:  # the CLI's own settings trust nothing: every internal address is refused
        refused(bench, kind, lambda: main(["play", CID, url]), lambda code: code == 2 or pytest.fail(str(code)))
        assert "refused to fetch" in capsys.readouterr().err
    assert bench.internal.hits == []  # the internal server was never asked
    assert issubclass(error, EchoqError)


def test_the_simulator_saw_only_valid_messages(bench: Bench) -> None:
    """Runs last in this module: every message the corpus put on the wire kept the protocol."""
    from worker import echo

    messages = wire(bench.redis, ROOM)
    assert messages and all(echo.validate(m, max_bytes=4096) == [] for m in messages)
    health = bench.api.get("/healthz", headers={"Authorization": ""})
    assert health.json() == {"status": "ok"} and bench.workers.started[0].name not in health.text
