"""The HTTP API for real: uvicorn on a free local port, real worker processes, the replica simulator.

Every endpoint and every error status (401, 404, 413, 422, 502, 503, 500) is exercised over HTTP.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import uvicorn
from pydantic import SecretStr

from producer.api import create_app
from producer.client import EchoqClient
from producer.tavus import TavusClient
from tests.conftest import TEST_REDIS_URL
from tests.fake_tavus import FakeTavus, fake_tavus_fixture  # noqa: F401  (the fake_tavus fixture)
from tests.integration.conftest import ROOT, Workers, heard_everything, wait_for, wire
from worker import keys
from worker.settings import Settings

pytestmark = pytest.mark.redis

TOKEN = "api-test-token-9c1d7e5b20f4"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

#: the request body of Tavus's echo quickstart, as its curl sends it (conversation id filled in)
QUICKSTART_BODY = """{
    "message_type": "conversation",
    "event_type": "conversation.echo",
    "conversation_id": "%s",
    "properties": {
        "modality": "text",
        "text": "Hello there!",
        "inference_id": "inference-id-123",
        "done": "true"
    }
}"""


# --- helpers ------------------------------------------------------------------------------------


@dataclass
class Api:
    """A running API: its base ``url``, the ASGI ``app`` and an ``http`` client with the token."""

    url: str
    app: Any
    http: httpx.Client

    def wait_state(self, utterance_id: str, states: tuple[str, ...] = ("sent", "spoken"), timeout: float = 30) -> dict[str, Any]:
        seen: list[dict[str, Any]] = [{}]

        def reached() -> dict[str, Any] | None:
            seen[0] = self.http.get(f"/v1/utterances/{utterance_id}").json()
            return seen[0] if seen[0].get("state") in states else None

        try:
            return dict(wait_for(reached, timeout, what=f"utterance {utterance_id} to reach {states}"))
        except BaseException:
            print(f"last seen: {seen[0]}")
            raise


@pytest.fixture
def serve(redis_client: redis.Redis) -> Iterator[Callable[..., Api]]:
    """Start apps under uvicorn in this process on free ports; stopped after the test."""
    servers: list[tuple[uvicorn.Server, threading.Thread, httpx.Client]] = []

    def start(app: Any = None, **kwargs: Any) -> Api:
        if app is None:
            kwargs.setdefault("tokens", [TOKEN])
            kwargs.setdefault("client", EchoqClient(TEST_REDIS_URL))
            app = create_app(**kwargs)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        wait_for(lambda: server.started, 10, what="uvicorn to start")
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        http = httpx.Client(base_url=url, headers=AUTH, timeout=30)
        servers.append((server, thread, http))
        return Api(url, app, http)

    yield start
    for server, thread, http in servers:
        http.close()
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def api(serve: Callable[..., Api]) -> Api:
    return serve()


def tone_wav(seconds: float, rate: int = 44100, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


def raw_pcm(seconds: float, rate: int) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * 300 * t)).astype("<i2").tobytes()


def echoes(client: redis.Redis, room: str, inference_id: str) -> list[dict[str, Any]]:
    return [m for m in wire(client, room)
            if m["event_type"] == "conversation.echo" and m["properties"]["inference_id"] == inference_id]


def sse_events(response: httpx.Response, count: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Parse ``id:``/``data:`` frames; stop after ``count`` events."""
    out: list[tuple[str, dict[str, Any]]] = []
    event_id, data = "", ""
    for line in response.iter_lines():
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and data:
            out.append((event_id, json.loads(data)))
            event_id, data = "", ""
            if count is not None and len(out) >= count:
                break
    return out


def field_of(response: httpx.Response) -> list[str | int]:
    assert response.status_code == 422, response.text
    return list(response.json()["detail"][0]["loc"])


def open_loopback(api: Api, conversation_id: str, room: str) -> dict[str, Any]:
    r = api.http.post("/v1/conversations", json={"conversation_id": conversation_id, "url": f"loopback://{room}"})
    assert r.status_code == 201, r.text
    return dict(r.json())


# --- the quickstart's curl ----------------------------------------------------------------------


def test_quickstart_curl_body_makes_the_simulator_hear_hello_there(
    workers: Workers, simulator: Any, api: Api, redis_client: redis.Redis
) -> None:
    workers.start(1)
    open_loopback(api, "qs", "qs-room")

    r = api.http.post("/send_text_message", content=QUICKSTART_BODY % "qs", headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["inference_id"] == "inference-id-123" and answer["state"] == "queued"
    rec = api.wait_state(answer["utterance_id"])
    assert rec["inference_id"] == "inference-id-123"

    (message,) = echoes(redis_client, "qs-room", "inference-id-123")
    assert message == {"message_type": "conversation", "event_type": "conversation.echo", "conversation_id": "qs",
                       "properties": {"modality": "text", "text": "Hello there!", "inference_id": "inference-id-123",
                                      "done": True}}
    assert message["properties"]["done"] is True
    # the simulator reads the room on its own schedule: wait until it has taken the utterance
    heard = wait_for(lambda: [u["done"] for u in simulator.report()["rooms"].get("qs-room", {}).get("utterances", [])
                              if u["inference_id"] == "inference-id-123"], 15, what="the simulator to hear it")
    assert heard == [True]
    assert simulator.report()["rooms"]["qs-room"]["violations"] == []

    # the same body with done as a boolean, or with neither done nor inference_id, also works
    for props in ({"modality": "text", "text": "Bool done.", "inference_id": "inf-bool", "done": True},
                  {"modality": "text", "text": "No extras."}):
        r = api.http.post("/send_text_message", json={"message_type": "conversation", "event_type": "conversation.echo",
                                                      "conversation_id": "qs", "properties": props})
        assert r.status_code == 200, r.text
        api.wait_state(r.json()["utterance_id"])
        assert echoes(redis_client, "qs-room", r.json()["inference_id"])[-1]["properties"]["done"] is True

    # audio: base64 of raw PCM at sample_rate; 16000 stays, 44100 is converted to 24000; a whole clip per request
    for rate, wire_rate in ((16000, 16000), (44100, 24000)):
        body = {"message_type": "conversation", "event_type": "conversation.echo", "conversation_id": "qs",
                "properties": {"modality": "audio", "audio": base64.b64encode(raw_pcm(0.5, rate)).decode(),
                               "sample_rate": rate, "inference_id": f"clip-{rate}", "done": "true"}}
        r = api.http.post("/send_text_message", json=body)
        assert r.status_code == 200, r.text
        api.wait_state(r.json()["utterance_id"])
        chunks = echoes(redis_client, "qs-room", f"clip-{rate}")
        assert len(chunks) > 1
        assert {c["properties"]["sample_rate"] for c in chunks} == {wire_rate}
        assert [c["properties"]["done"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    played = wait_for(lambda: [u for u in simulator.report()["rooms"]["qs-room"]["utterances"]
                               if u["inference_id"].startswith("clip-") and u["done"]], 30, what="the clips to play")
    assert len(played) == 2
    assert simulator.report()["rooms"]["qs-room"]["violations"] == []

    # an interrupt message interrupts
    r = api.http.post("/send_text_message", json={"message_type": "conversation", "event_type": "conversation.interrupt",
                                                  "conversation_id": "qs"})
    assert r.status_code == 200 and r.json()["state"] == "interrupted", r.text

    # its errors: 404 for a conversation that is not open, 422 naming the field
    r = api.http.post("/send_text_message", content=QUICKSTART_BODY % "nobody", headers={"Content-Type": "application/json"})
    assert r.status_code == 404 and "nobody" in r.json()["detail"]
    again = api.http.post("/send_text_message", content=QUICKSTART_BODY % "qs", headers={"Content-Type": "application/json"})
    assert field_of(again) == ["body", "properties", "inference_id"]  # one inference_id, one utterance
    base = {"message_type": "conversation", "event_type": "conversation.echo", "conversation_id": "qs"}
    cases: list[tuple[dict[str, Any], list[str | int]]] = [
        ({"modality": "text", "text": "x", "done": "false"}, ["body", "properties", "done"]),
        ({"modality": "text", "text": "x", "done": "maybe"}, ["body", "properties", "done", "bool"]),
        ({"modality": "text"}, ["body", "properties", "text"]),
        ({"modality": "text", "text": "   "}, ["body", "properties", "text"]),
        ({"modality": "text", "text": "y" * 5000}, ["body", "properties", "text"]),
        ({"modality": "audio"}, ["body", "properties", "audio"]),
        ({"modality": "audio", "audio": "not base64!"}, ["body", "properties", "audio"]),
        ({"modality": "audio", "audio": base64.b64encode(b"\x00").decode()}, ["body", "properties", "audio"]),
        ({"modality": "video", "text": "x"}, ["body", "properties", "modality"]),
    ]
    for props, loc in cases:
        assert field_of(api.http.post("/send_text_message", json={**base, "properties": props})) == loc, props
    assert field_of(api.http.post("/send_text_message", json={**base, "event_type": "conversation.respond",
                                                              "properties": {"modality": "text", "text": "x"}})
                    ) == ["body", "event_type"]


# --- the /v1 resources --------------------------------------------------------------------------


def test_v1_conversation_and_utterance_resources_end_to_end(
    workers: Workers, simulator: Any, serve: Callable[..., Api], redis_client: redis.Redis, tmp_path: Path
) -> None:
    # the audio URL below is on this machine, which only the allow-list lets the API fetch
    api = serve(client=EchoqClient(TEST_REDIS_URL, settings=Settings(fetch_allow_hosts="127.0.0.1")))
    workers.start(1)
    conv = open_loopback(api, "v1", "v1-room")
    assert conv["id"] == "v1" and conv["state"] == "open" and conv["url"] == "loopback://v1-room"
    shown = wait_for(lambda: (c := api.http.get("/v1/conversations/v1").json())["owner"] and c, 30,
                     what="a worker to own the conversation")
    assert shown["owner"] == workers.started[0].name and shown["backlog"] == 0
    assert shown["cursor"] == {"seq": 0, "chunk": 0} and shown["current_utterance"] is None

    clip = tone_wav(0.3)
    (tmp_path / "clip.wav").write_bytes(clip)
    files = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietFiles, directory=str(tmp_path)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        ids = []
        r = api.http.post("/v1/conversations/v1/utterances", json={"text": "First line.", "id": "u-text"})
        assert r.status_code == 202 and r.json() == {"utterance_id": "u-text", "conversation_id": "v1", "state": "queued"}
        ids.append("u-text")
        r = api.http.post("/v1/conversations/v1/utterances",
                          json={"audio_base64": base64.b64encode(clip).decode(), "sample_rate": 16000, "inference_id": "inf-b64"})
        assert r.status_code == 202, r.text
        ids.append(r.json()["utterance_id"])
        r = api.http.post("/v1/conversations/v1/utterances/audio", files={"audio": ("clip.wav", clip, "audio/wav")},
                          data={"id": "u-upload"})
        assert r.status_code == 202 and r.json()["utterance_id"] == "u-upload", r.text
        ids.append("u-upload")
        r = api.http.post("/v1/conversations/v1/utterances",
                          json={"audio_url": f"http://127.0.0.1:{files.server_address[1]}/clip.wav", "id": "u-url"})
        assert r.status_code == 202, r.text
        ids.append("u-url")
        # a URL that cannot be fetched is refused up front, naming the field
        r = api.http.post("/v1/conversations/v1/utterances",
                          json={"audio_url": f"http://127.0.0.1:{files.server_address[1]}/missing.wav"})
        assert field_of(r) == ["body", "audio_url"] and "404" in r.json()["detail"][0]["msg"]
    finally:
        files.shutdown()
        files.server_close()

    records = [api.wait_state(uid) for uid in ids]
    assert [rec["kind"] for rec in records] == ["text", "audio", "audio", "audio"]
    assert records[1]["inference_id"] == "inf-b64" and records[1]["sample_rate"] == 16000
    order = []
    for m in wire(redis_client, "v1-room"):
        inf = m.get("properties", {}).get("inference_id")
        if inf and inf not in order:
            order.append(inf)
    assert order == ["u-text", "inf-b64", "u-upload", "u-url"]
    assert heard_everything(simulator, redis_client, "v1-room")["violations"] == []

    # events as server-sent events: read a few, then resume after one with Last-Event-ID
    with api.http.stream("GET", "/v1/conversations/v1/events", params={"limit": 4}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        first = sse_events(r)
    assert len(first) == 4 and first[0][1]["type"] == "conversation.opened"
    with api.http.stream("GET", "/v1/conversations/v1/events", headers={"Last-Event-ID": first[1][0]}) as r:
        resumed = sse_events(r, count=2)  # a live stream: stop reading after two
    assert resumed == first[2:4]
    types = {e["type"] for _id, e in sse_events_all(api, "v1")}
    assert {"conversation.opened", "conversation.joined", "utterance.sending", "utterance.sent"} <= types

    # interrupt: queued utterances are cancelled, and the stream shows it
    long_ids = [api.http.post("/v1/conversations/v1/utterances", json={"text": f"Queued {i}."}).json()["utterance_id"]
                for i in range(3)]
    r = api.http.post("/v1/conversations/v1/interrupt")
    assert r.status_code == 200 and r.json()["conversation_id"] == "v1" and r.json()["cancelled"] >= 0
    for uid in long_ids:
        api.wait_state(uid, ("sent", "spoken", "cancelled", "interrupted"))
    assert "interrupt.requested" in {e["type"] for _id, e in sse_events_all(api, "v1")}

    # close: the conversation stops taking utterances; closing again is harmless
    r = api.http.post("/v1/conversations/v1/close")
    assert r.status_code == 202 and r.json()["state"] in ("closing", "closed") and r.json()["ended_on_tavus"] is False
    wait_for(lambda: api.http.get("/v1/conversations/v1").json()["state"] == "closed", 30, what="the close")
    assert api.http.post("/v1/conversations/v1/close", json={}).json()["state"] == "closed"
    r = api.http.post("/v1/conversations/v1/utterances", json={"text": "Too late."})
    assert r.status_code == 404 and "closed" in r.json()["detail"]


def sse_events_all(api: Api, conversation_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Every event kept so far (the stream is cut after as many as the history holds)."""
    total = len(api.app.state.echoq.events(conversation_id, count=10_000))
    with api.http.stream("GET", f"/v1/conversations/{conversation_id}/events", params={"limit": total}) as r:
        return sse_events(r)


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


# --- errors -------------------------------------------------------------------------------------

#: every authenticated endpoint, with a request that would succeed (or reach a handler) with a token
ENDPOINTS: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/send_text_message", {"content": QUICKSTART_BODY % "gate", "headers": {"Content-Type": "application/json"}}),
    ("POST", "/v1/conversations", {"json": {"conversation_id": "gate", "url": "loopback://gate"}}),
    ("GET", "/v1/conversations/gate", {}),
    ("POST", "/v1/conversations/gate/close", {}),
    ("POST", "/v1/conversations/gate/interrupt", {}),
    ("GET", "/v1/conversations/gate/events", {"params": {"limit": 1}}),
    ("POST", "/v1/conversations/gate/utterances", {"json": {"text": "hi"}}),
    ("POST", "/v1/conversations/gate/utterances/audio", {"files": {"audio": ("a.wav", b"RIFF", "audio/wav")}}),
    ("GET", "/v1/utterances/u1", {}),
    ("GET", "/v1/nowhere", {}),
]


def test_a_missing_or_wrong_token_never_reaches_a_handler(
    workers: Workers, simulator: Any, serve: Callable[..., Api], redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture
) -> None:
    workers.start(1)
    api = serve(tokens=["other-token-1", TOKEN])
    caplog.set_level(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    before = sorted(redis_client.keys("echoq:conv*") + redis_client.keys("echoq:utt*"))
    bad_headers: list[dict[str, str]] = [
        {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"}, {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN}, {"Authorization": "Bearer"}, {"Authorization": f"Token {TOKEN}"},
    ]
    with httpx.Client(base_url=api.url, timeout=10) as bare:
        for method, path, kwargs in ENDPOINTS:
            for headers in bad_headers:
                extra = dict(kwargs.get("headers", {}))
                r = bare.request(method, path, **{**kwargs, "headers": {**extra, **headers}})
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                assert TOKEN not in r.text
    assert sum(api.app.state.handler_calls.values()) == 0
    assert sorted(redis_client.keys("echoq:conv*") + redis_client.keys("echoq:utt*")) == before

    # health and the docs are open; the second configured token works too; the scheme is case-free
    with httpx.Client(base_url=api.url, timeout=10) as bare:
        health = bare.get("/healthz")
        # without a token: only whether it is healthy, no worker (host) names
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        health = bare.get("/healthz", headers=AUTH)
        assert health.status_code == 200 and health.json()["redis"] is True
        assert any(w["name"] == workers.started[0].name for w in health.json()["workers"])
        assert bare.get("/openapi.json").status_code == 200 and bare.get("/docs").status_code == 200
        assert "bearer" in json.dumps(bare.get("/openapi.json").json()["components"]["securitySchemes"]).lower()
        r = bare.post("/v1/conversations", json={"conversation_id": "gate", "url": "loopback://gate"},
                      headers={"Authorization": "bearer other-token-1"})
        assert r.status_code == 201, r.text
    assert api.app.state.handler_calls == {"open_conversation": 1}
    assert TOKEN not in caplog.text and "other-token-1" not in caplog.text


def test_error_statuses_name_the_problem(
    workers: Workers, simulator: Any, serve: Callable[..., Api], redis_client: redis.Redis
) -> None:
    workers.start(1)
    api = serve(max_body_bytes=64 * 1024)
    http = api.http

    # 404: unknown conversation on every conversation endpoint, unknown utterance
    for method, path, kwargs in ENDPOINTS[1:-1]:
        if path == "/v1/conversations":
            continue
        r = http.request(method, path.replace("gate", "ghost").replace("u1", "ghost-utt"), **kwargs)
        assert r.status_code == 404, (path, r.text)
        assert "ghost" in r.json()["detail"]
    r = http.post("/send_text_message", content=QUICKSTART_BODY % "ghost", headers={"Content-Type": "application/json"})
    assert r.status_code == 404

    # 422 with the field named
    assert field_of(http.post("/v1/conversations", json={"conversation_id": "ok", "url": "ftp://x"})) == ["body", "url"]
    assert field_of(http.post("/v1/conversations", json={"conversation_id": "bad id", "url": "loopback://r"})
                    ) == ["body", "conversation_id"]
    assert field_of(http.post("/v1/conversations", json={"url": "loopback://r"}))[0] == "body"
    assert field_of(http.post("/v1/conversations", json={"conversation_id": "c", "url": "loopback://r", "nope": 1})
                    ) == ["body", "nope"]
    assert field_of(http.post("/v1/conversations", content=b"{not json", headers={"Content-Type": "application/json"})
                    )[0] == "body"
    open_loopback(api, "err", "err-room")
    post = partial(http.post, "/v1/conversations/err/utterances")
    assert field_of(post(json={})) == ["body"]
    assert "exactly one" in post(json={"text": "a", "audio_url": "http://x/a.wav"}).json()["detail"][0]["msg"]
    assert field_of(post(json={"text": " "})) == ["body", "text"]
    assert field_of(post(json={"text": "z" * 5000})) == ["body", "text"]
    assert field_of(post(json={"audio_base64": "%%%"})) == ["body", "audio_base64"]
    assert field_of(post(json={"audio_base64": base64.b64encode(b"not audio at all").decode()})) == ["body", "audio_base64"]
    assert field_of(post(json={"audio_base64": base64.b64encode(b"\x00\x00").decode(), "format": "raw"})
                    ) == ["body", "source_rate"]
    assert field_of(post(json={"audio_url": "file:///etc/passwd"})) == ["body", "audio_url"]
    assert field_of(post(json={"text": "hi", "sample_rate": 22050})) == ["body", "sample_rate"]
    assert field_of(post(json={"text": "hi", "id": "bad id"})) == ["body", "id"]
    assert field_of(http.post("/v1/conversations/err/utterances/audio", data={"id": "x"})) == ["body", "audio"]
    assert field_of(http.post("/v1/conversations/err/utterances/audio", files={"audio": ("a.bin", b"junk", "x/y")})
                    ) == ["body", "audio"]
    assert field_of(http.get("/v1/conversations/err/events", params={"after": "yesterday"})) == ["query", "after"]
    assert field_of(http.get("/v1/conversations/err/events", headers={"Last-Event-ID": "x"})
                    ) == ["header", "last-event-id"]
    assert field_of(http.post("/v1/conversations/err/close", json={"end_on_tavus": "perhaps"}))[:2] == ["body", "end_on_tavus"]
    assert field_of(http.get("/v1/conversations/-bad-")) == ["path", "conversation_id"]
    # no 422 ever echoes the input back
    r = post(json={"audio_base64": "A" * 1000 + "%"})
    assert "AAAAAAAA" not in r.text

    # 413: at once from Content-Length, and while a chunked body streams in
    big = json.dumps({"audio_base64": "A" * (64 * 1024)})
    r = post(content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks(head: bytes = b"") -> Iterator[bytes]:
        yield head
        for _ in range(8):
            yield b"A" * (16 * 1024)

    for path in ("/v1/conversations/err/utterances", "/send_text_message"):
        r = http.post(path, content=chunks(), headers={"Content-Type": "application/json"})  # chunked: no length
        assert r.status_code == 413, (path, r.text)
    head = b'--xx\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n\r\n'
    r = http.post("/v1/conversations/err/utterances/audio", content=chunks(head),
                  headers={"Content-Type": "multipart/form-data; boundary=xx"})
    assert r.status_code == 413, r.text
    r = http.post("/v1/conversations/err/utterances/audio", files={"audio": ("big.wav", tone_wav(1.0), "audio/wav")})
    assert r.status_code == 413

    # nothing was queued by any refused request
    assert http.get("/v1/conversations/err").json()["utterances"] == 0


def test_redis_unreachable_is_503_with_a_clear_message(serve: Callable[..., Api]) -> None:
    api = serve(client=EchoqClient("redis://127.0.0.1:1/0"))
    for method, path, kwargs in ENDPOINTS[:-1]:
        r = api.http.request(method, path, **kwargs)
        if path.endswith("/utterances/audio"):
            assert r.status_code in (503, 422), r.text  # the audio is checked before Redis is needed
            continue
        assert r.status_code == 503, (path, r.text)
        assert r.json()["detail"].startswith("Redis is unreachable"), r.text
        assert "Traceback" not in r.text
    health = api.http.get("/healthz")
    assert health.status_code == 503 and health.json()["redis"] is False
    assert health.json()["detail"].startswith("Redis is unreachable")
    with httpx.Client(base_url=api.url, timeout=10) as bare:
        health = bare.get("/healthz")
    assert health.status_code == 503 and health.json() == {"status": "unavailable"}
    r = api.http.post("/v1/conversations/gate/utterances/audio", files={"audio": ("a.wav", tone_wav(0.1), "audio/wav")})
    assert r.status_code == 503 and r.json()["detail"].startswith("Redis is unreachable")


def test_an_unexpected_error_is_a_json_500_without_a_traceback(
    serve: Callable[..., Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = EchoqClient(TEST_REDIS_URL)

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(client, "conversation", broken)
    api = serve(client=client)
    r = api.http.get("/v1/conversations/any")
    assert r.status_code == 500
    assert r.json() == {"detail": "internal error (RuntimeError); see the API log"}
    assert "Traceback" not in r.text and "secret internals" not in r.text


# --- Tavus --------------------------------------------------------------------------------------


def test_open_from_a_persona_creates_on_tavus_and_close_can_end_it(
    serve: Callable[..., Api], fake_tavus: FakeTavus, redis_client: redis.Redis
) -> None:
    """No worker here: the room Tavus hands out is a Daily URL, which a test worker cannot join."""
    persona = fake_tavus.add_persona("echo", default_replica_id="r-default")
    settings = Settings(_env_file=None, tavus_api_key=SecretStr(fake_tavus.api_key), tavus_base_url=fake_tavus.url)  # type: ignore[call-arg]
    api = serve(settings=settings, client=EchoqClient(TEST_REDIS_URL),
                tavus_factory=lambda: TavusClient(fake_tavus.api_key, fake_tavus.url, max_retries=1, backoff_base=0.01))

    r = api.http.post("/v1/conversations", json={"persona_id": persona["persona_id"], "conversation_name": "Demo"})
    assert r.status_code == 201, r.text
    conv = r.json()
    cid = conv["tavus"]["conversation_id"]
    assert conv["id"] == cid and conv["url"] == f"https://tavus.daily.co/{cid}" and conv["state"] == "open"
    assert conv["tavus"]["status"] == "active"
    sent = fake_tavus.requests("POST", "/v2/conversations")[0]
    assert sent.body == {"persona_id": persona["persona_id"], "conversation_name": "Demo"}

    # Tavus refusing the caller's persona is a 422 naming it, with Tavus's message
    r = api.http.post("/v1/conversations", json={"persona_id": "p-unknown"})
    assert field_of(r) == ["body", "persona_id"] and "Invalid persona_id" in r.json()["detail"][0]["msg"]
    assert field_of(api.http.post("/v1/conversations", json={"persona_id": "p", "conversation_id": "c", "url": "loopback://x"})
                    ) == ["body"]

    # Tavus failing is a 502 with its message; nothing changes here; the key never shows
    fake_tavus.fail(times=2, status=503, message="Service temporarily unavailable")
    r = api.http.post(f"/v1/conversations/{cid}/close", json={"end_on_tavus": True})
    assert r.status_code == 502 and "Service temporarily unavailable" in r.json()["detail"]
    assert api.http.get(f"/v1/conversations/{cid}").json()["state"] == "open"
    fake_tavus.echo_headers(status=400)
    r = api.http.post("/v1/conversations", json={"persona_id": persona["persona_id"]})
    assert r.status_code == 422 and fake_tavus.api_key not in r.text
    bad_key = serve(settings=settings, client=EchoqClient(TEST_REDIS_URL),
                    tavus_factory=lambda: TavusClient("wrong-key", fake_tavus.url, max_retries=0))
    r = bad_key.http.post("/v1/conversations", json={"persona_id": persona["persona_id"]})
    assert r.status_code == 502 and "Invalid access token" in r.json()["detail"]

    # close with end_on_tavus ends it there, then closes it here
    r = api.http.post(f"/v1/conversations/{cid}/close", json={"end_on_tavus": True})
    assert r.status_code == 202 and r.json()["ended_on_tavus"] is True, r.text
    assert fake_tavus.state.conversations[cid]["status"] == "ended"
    assert api.http.get(f"/v1/conversations/{cid}").json()["state"] in ("closing", "closed")

    # Tavus not knowing the conversation is a 404; no key configured is a 503 that says so
    open_loopback(api, "local-only", "lo")
    r = api.http.post("/v1/conversations/local-only/close", json={"end_on_tavus": True})
    assert r.status_code == 404 and "Tavus" in r.json()["detail"]
    unconfigured = serve(settings=Settings(_env_file=None, tavus_api_key=None), client=EchoqClient(TEST_REDIS_URL))  # type: ignore[call-arg]
    r = unconfigured.http.post("/v1/conversations", json={"persona_id": "p1"})
    assert r.status_code == 503 and "TAVUS_API_KEY" in r.json()["detail"]


# --- the command ----------------------------------------------------------------------------------


def test_echoq_api_command_needs_tokens_and_serves_with_them(redis_client: redis.Redis) -> None:
    env = {**os.environ, "ECHOQ_REDIS_URL": TEST_REDIS_URL, "ECHOQ_API_TOKENS": ""}
    refused = subprocess.run([sys.executable, "-m", "producer.cli", "api", "--port", "1"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "ECHOQ_API_TOKENS" in refused.stderr and "--no-auth" in refused.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env["ECHOQ_API_TOKENS"] = f" first-token , {TOKEN} "
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()[0]
                return False

        wait_for(up, 30, what="echoq api to answer")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/utterances/x", timeout=5).status_code == 401
        r = httpx.post(f"http://127.0.0.1:{port}/v1/conversations", headers=AUTH, timeout=5,
                       json={"conversation_id": "cli", "url": "loopback://cli"})
        assert r.status_code == 201, r.text
        assert redis_client.hget(keys.conversation("cli"), "state") == b"open"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
    assert TOKEN not in output and "first-token" not in output
