"""No secret leaks: the Tavus key, the API tokens and meeting tokens never reach a log line, an
error, a Celery task or a Redis value, across flows through the API, the CLI and a worker —
failures included.

The search looks for each secret as it is, URL-quoted, and inside base64 at every alignment
(Celery message bodies are base64 in Redis).
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import redis
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient
from pydantic import SecretStr

from tests.conftest import TEST_REDIS_URL
from tests.fake_tavus import FakeTavus
from tests.integration.conftest import Workers, wait_for
from worker import keys
from worker.settings import Settings

pytestmark = pytest.mark.redis

TAVUS_KEY = f"tvs-secret-{uuid.uuid4().hex}"
API_TOKEN = f"api-secret-{uuid.uuid4().hex}"
MEETING_TOKEN = f"eyJhbGciOiJIUzI1NiJ9.mtg-secret-{uuid.uuid4().hex}.sig"
#: the key that seals meeting tokens at rest: a secret too
SECRET_KEY = Fernet.generate_key().decode()
SECRETS = {"TAVUS_API_KEY": TAVUS_KEY, "API token": API_TOKEN, "meeting token": MEETING_TOKEN,
           "ECHOQ_SECRET_KEY": SECRET_KEY}


def forms(secret: str) -> set[bytes]:
    """``secret`` as bytes, URL-quoted, and the stretch of its base64 at each of the three alignments
    that does not depend on what surrounds it."""
    raw = secret.encode()
    out = {raw, quote(secret, safe="").encode(), quote_plus(secret).encode()}
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw)
        start = -(-shift * 8 // 6)  # characters that still carry bits of the padding before it
        out.add(encoded[start:-4])
    return out


def leaks(where: str, blobs: Iterable[bytes | str]) -> list[str]:
    """Which secret (by name) appears in which of ``blobs``."""
    found = []
    for i, blob in enumerate(blobs):
        data = blob.encode("utf-8", "surrogateescape") if isinstance(blob, str) else blob
        found += [f"{name} in {where}[{i}]" for name, secret in SECRETS.items() if any(f in data for f in forms(secret))]
    return found


def redis_values(client: redis.Redis) -> Iterator[bytes]:
    """Every key and every value of every type in the test database."""
    for key in client.scan_iter(count=1000):
        yield key
        kind = client.type(key).decode()
        if kind == "string":
            yield client.get(key) or b""
        elif kind == "hash":
            for k, v in client.hgetall(key).items():
                yield k + b"=" + v
        elif kind == "list":
            yield from client.lrange(key, 0, -1)
        elif kind == "set":
            yield from client.smembers(key)
        elif kind == "zset":
            yield from (m for m, _ in client.zrange(key, 0, -1, withscores=True))
        elif kind == "stream":
            for _id, fields in client.xrange(key):
                yield b" ".join(k + b"=" + v for k, v in fields.items())
        else:
            pytest.fail(f"key {key!r} has a type the scan does not read: {kind}")


def test_the_search_finds_each_secret_in_every_form_it_looks_for() -> None:
    """The check below can fail: each secret is found plain, quoted and inside base64."""
    for secret in SECRETS.values():
        for prefix in ("", "x", "xy"):
            hidden = base64.b64encode(f'{prefix}{{"url": "https://r?t={secret}"}}'.encode())
            assert leaks("probe", [hidden]) and leaks("probe", [quote(secret, safe="")]) and leaks("probe", [secret])
    assert leaks("probe", [b"nothing secret here"]) == []


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch, redis_client: redis.Redis) -> Iterator[None]:
    from worker.settings import get_settings

    monkeypatch.setenv("TAVUS_API_KEY", TAVUS_KEY)
    monkeypatch.setenv("ECHOQ_API_TOKENS", API_TOKEN)
    monkeypatch.setenv("ECHOQ_SECRET_KEY", SECRET_KEY)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_no_secret_in_logs_errors_tasks_or_redis(
    secret_env: None, workers: Workers, simulator: Any, redis_client: redis.Redis, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from producer.api import create_app
    from producer.cli.main import main
    from producer.client import EchoqClient
    from producer.tavus import TavusClient
    from worker.celery_app import app as celery_app

    caplog.set_level(logging.DEBUG)
    tasks: list[str] = []
    real_send = celery_app.send_task

    def recording_send(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        tasks.append(json.dumps({"name": name, "args": args, "kwargs": kwargs, "options": options}, default=str))
        return real_send(name, args=args, kwargs=kwargs, **options)

    monkeypatch.setattr(celery_app, "send_task", recording_send)
    workers.start(1, TAVUS_API_KEY=TAVUS_KEY, ECHOQ_API_TOKENS=API_TOKEN, ECHOQ_LOG_LEVEL="DEBUG")
    answers: list[str] = []

    with FakeTavus(api_key=TAVUS_KEY, conversation_url="loopback://{conversation_id}") as tavus:
        settings = Settings(tavus_api_key=SecretStr(TAVUS_KEY), tavus_base_url=tavus.url)
        client = EchoqClient(TEST_REDIS_URL, settings=settings)
        app = create_app(tokens=[API_TOKEN], settings=settings, client=client,
                         tavus_factory=lambda: TavusClient(TAVUS_KEY, tavus.url, max_retries=0))
        api = TestClient(app, headers={"Authorization": f"Bearer {API_TOKEN}"})

        def call(method: str, path: str, status: int, **kw: Any) -> dict[str, Any]:
            r = api.request(method, path, **kw)
            answers.append(r.text)
            assert r.status_code == status, r.text
            return dict(r.json()) if r.content else {}

        # a conversation created on (fake) Tavus with the key, then spoken in by the worker
        persona = tavus.add_persona("echo", default_replica_id="r-default")
        cid = call("POST", "/v1/conversations", 201, json={"persona_id": persona["persona_id"]})["id"]
        said = call("POST", f"/v1/conversations/{cid}/utterances", 202, json={"text": "Nothing secret."})
        assert client.wait(said["utterance_id"], timeout=30)["state"] in ("sent", "spoken")

        # failures: a wrong token (the Tavus key offered as one), Tavus echoing the key back,
        # Tavus down, URLs carrying tokens, a worker-side failure
        call("GET", f"/v1/conversations/{cid}", 401, headers={"Authorization": f"Bearer {TAVUS_KEY}"})
        tavus.echo_headers(status=400)
        call("POST", "/v1/conversations", 422, json={"persona_id": persona["persona_id"]})
        tavus.fail(times=1, status=503)
        call("POST", f"/v1/conversations/{cid}/close", 502, json={"end_on_tavus": True})
        call("POST", f"/v1/conversations/{cid}/utterances", 422,
             json={"audio_url": f"http://u:{API_TOKEN}@127.0.0.1:1/a.wav?t={MEETING_TOKEN}&key={TAVUS_KEY}"})
        call("POST", "/v1/conversations", 422, json={"conversation_id": "bad-url", "url": f"ftp://room/?t={MEETING_TOKEN}"})
        call("GET", "/healthz", 200, headers={"Authorization": ""})
        lost = client._enqueue(cid, {"utterance_id": "no-blob", "kind": "audio", "inference_id": "no-blob",
                                     "sample_rate": 24000, "format": "wav", "source_rate": None, "channels": 1},
                               {"kind": "audio", "sample_rate": 24000})
        assert client.wait(lost, timeout=30, states=("failed",))["error"]

        # the CLI, with the key and the tokens in its environment
        assert main(["say", cid, "From the command line."]) == 0
        assert main(["play", cid, f"http://127.0.0.1:1/a.wav?t={MEETING_TOKEN}"]) == 2
        assert main(["open", "cli-bad", "--url", f"ftp://room/?t={MEETING_TOKEN}"]) == 2
        monkeypatch.setenv("ECHOQ_TAVUS_BASE_URL", tavus.url)
        from worker.settings import get_settings

        get_settings.cache_clear()
        tavus.echo_headers(status=400)
        assert main(["tavus", "persona", "get", persona["persona_id"]]) != 0
        assert main(["tavus", "persona", "get", persona["persona_id"]]) == 0
        cli = capsys.readouterr()
        api.close()
        wait_for(lambda: redis_client.llen(keys.conv_queue(cid)) == 0, 30, what="the worker to take every task")

    workers.stop_all()
    found = (leaks("API answer", answers) + leaks("CLI output", [cli.out, cli.err]) + leaks("log", [caplog.text])
             + leaks("worker log", [w.log() for w in workers.started]) + leaks("Celery task", tasks)
             + leaks("Redis", redis_values(redis_client)))
    assert found == []
    assert tasks and answers and workers.started[0].log()  # the flows ran and were looked at


def test_a_meeting_token_in_a_room_url_is_never_stored_in_plaintext(secret_env: None, redis_client: redis.Redis) -> None:
    from producer.client import EchoqClient
    from worker import sealing

    client = EchoqClient(TEST_REDIS_URL)
    record = client.open("sealed", f"https://example.daily.co/room?t={MEETING_TOKEN}")
    assert leaks("Redis", redis_values(redis_client)) == []
    assert leaks("open's answer", [json.dumps(record)]) == []
    # what is stored is the token, sealed: the worker can still join with it
    sealed = redis_client.hget(keys.conversation("sealed"), sealing.TOKEN_FIELD)
    assert sealed and sealing.unseal(sealed.decode(), SecretStr(SECRET_KEY)) == MEETING_TOKEN
