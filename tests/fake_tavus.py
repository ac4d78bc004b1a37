"""A fake Tavus REST API for tests: a local HTTP server with in-memory personas and conversations.

It answers with the shapes in PROTOCOL.md (``persona_id``; ``conversation_id``,
``conversation_url`` like ``https://tavus.daily.co/<id>``, ``status`` active/ended; 204 on
delete), checks ``x-api-key`` (401 with a JSON ``message`` otherwise), records every request, and
can be told to misbehave for the next requests: 429 with ``Retry-After``, 5xx, a slow answer, a
dropped connection, a Tavus-style 4xx, or an error body that echoes the request headers back.
``conversation_url`` (a template with ``{conversation_id}``) changes the room URL it hands out,
e.g. ``loopback://{conversation_id}`` so that workers and the simulator can use the room.

Use the ``fake_tavus`` fixture (import ``fake_tavus_fixture`` into a test module), or :class:`FakeTavus` directly::

    with FakeTavus() as tavus:
        tavus.rate_limit(times=2, retry_after="3")
        client = TavusClient(tavus.api_key, tavus.url)
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

DEFAULT_KEY = "tvs-test-key-6f1c0e2a9b7d4c35"
DEFAULT_CONVERSATION_URL = "https://tavus.daily.co/{conversation_id}"
#: create fields the fake keeps on the conversation as they came
CREATE_OPTIONS = ("require_auth", "test_mode", "audio_only", "custom_greeting", "conversational_context")


@dataclass
class RecordedRequest:
    """One request as the fake saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any = None


@dataclass
class Fault:
    """What to do instead of (or before) answering one request."""

    status: int | None = None
    message: str = ""
    field: str = "message"
    retry_after: str | None = None
    text: str | None = None
    delay: float = 0.0
    drop: bool = False
    lose_answer: bool = False
    echo_headers: bool = False


@dataclass
class FakeState:
    """The fake's memory: what exists, and every request it has seen."""

    personas: dict[str, dict[str, Any]] = field(default_factory=dict)
    conversations: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    faults: deque[Fault] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:12]


class FakeTavus:
    """The fake server: ``url`` (the ``/v2`` base), ``api_key``, ``state`` and fault controls."""

    def __init__(self, api_key: str = DEFAULT_KEY, conversation_url: str = DEFAULT_CONVERSATION_URL) -> None:
        self.api_key = api_key
        #: the ``conversation_url`` of new conversations; ``{conversation_id}`` is filled in
        self.conversation_url = conversation_url
        self.state = FakeState()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}/v2"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-tavus", daemon=True
        )

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeTavus:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving; slow answers still waiting are released at once."""
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeTavus:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- faults ---------------------------------------------------------------------------------

    def _add(self, fault: Fault, times: int) -> None:
        with self.state.lock:
            self.state.faults.extend(Fault(**fault.__dict__) for _ in range(times))

    def rate_limit(
        self, times: int = 1, retry_after: str | None = "1", message: str = "Rate limit exceeded"
    ) -> None:
        """The next ``times`` requests get 429, with ``Retry-After`` when given."""
        self._add(Fault(status=429, message=message, retry_after=retry_after), times)

    def fail(
        self, times: int = 1, status: int = 503, message: str = "Service temporarily unavailable"
    ) -> None:
        """The next ``times`` requests get a server error."""
        self._add(Fault(status=status, message=message), times)

    def reject(
        self, status: int = 400, message: str = "Invalid request", field: str = "error", times: int = 1
    ) -> None:
        """The next ``times`` requests get a Tavus-style 4xx, ``{field: message}``."""
        self._add(Fault(status=status, message=message, field=field), times)

    def concurrency_limit(self, times: int = 1) -> None:
        """The next ``times`` requests get Tavus's 400 for an account over its concurrency limit."""
        self.reject(400, "User has reached maximum concurrent conversations", field="message", times=times)

    def fail_text(self, text: str, status: int = 502, times: int = 1) -> None:
        """The next ``times`` requests get an error with a plain-text body (a proxy's page)."""
        self._add(Fault(status=status, text=text), times)

    def lose_answer(self, times: int = 1) -> None:
        """The next ``times`` requests are carried out, then the connection is closed before the
        answer: the client cannot tell whether anything happened."""
        self._add(Fault(lose_answer=True), times)

    def slow(self, seconds: float, times: int = 1) -> None:
        """The next ``times`` requests wait ``seconds`` before answering normally."""
        self._add(Fault(delay=seconds), times)

    def drop(self, times: int = 1) -> None:
        """The next ``times`` requests are read, then the connection is closed without an answer."""
        self._add(Fault(drop=True), times)

    def echo_headers(self, status: int = 400, times: int = 1) -> None:
        """The next ``times`` requests get an error whose message repeats every request header,
        the API key included: what a careless proxy or server might do."""
        self._add(Fault(status=status, echo_headers=True), times)

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    # --- inspection -----------------------------------------------------------------------------

    def requests(self, method: str | None = None, path: str | None = None) -> list[RecordedRequest]:
        """Requests seen, optionally only those with this method and/or path (``/v2/...``)."""
        with self.state.lock:
            seen = list(self.state.requests)
        return [
            r for r in seen if (method is None or r.method == method) and (path is None or r.path == path)
        ]

    @property
    def request_count(self) -> int:
        with self.state.lock:
            return len(self.state.requests)

    def add_persona(self, name: str = "seeded", **fields: Any) -> dict[str, Any]:
        """Put a persona straight into the state (no request); returns it."""
        persona = {
            "persona_id": _new_id("p"),
            "persona_name": name,
            "pipeline_mode": "echo",
            "created_at": _now(),
            **fields,
        }
        with self.state.lock:
            self.state.personas[persona["persona_id"]] = persona
        return persona

    # --- the HTTP side --------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: simple and predictable
            server_version = "FakeTavus/1.0"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_DELETE(self) -> None:
                fake._handle(self, "DELETE")

            def do_PATCH(self) -> None:
                fake._handle(self, "PATCH")

        return Handler

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        body: Any = None
        bad_json = False
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                bad_json = True
        path = h.path.split("?", 1)[0]
        headers = {k: v for k, v in h.headers.items()}
        with self.state.lock:
            self.state.requests.append(RecordedRequest(method, h.path, headers, body))
            fault = self.state.faults.popleft() if self.state.faults else None

        if fault is not None:
            if fault.delay and self._stopping.wait(fault.delay):
                return
            if fault.drop:
                h.close_connection = True
                return
            if fault.echo_headers:
                dump = "; ".join(f"{k}: {v}" for k, v in headers.items())
                self._send(h, fault.status or 400, {"message": f"Bad request. Headers received: {dump}"})
                return
            if fault.status is not None and fault.text is not None:
                self._send_raw(h, fault.status, fault.text.encode(), "text/plain")
                return
            if fault.status is not None:
                extra = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                self._send(h, fault.status, {fault.field: fault.message}, extra)
                return

        if h.headers.get("x-api-key") != self.api_key:
            self._send(h, 401, {"message": "Invalid access token"})
            return
        if bad_json:
            self._send(h, 400, {"error": "Invalid JSON body"})
            return
        status, answer = self._route(method, path, body)
        if fault is not None and fault.lose_answer:
            h.close_connection = True
            return
        self._send(h, status, answer)

    def _route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if not parts or parts[0] != "v2":
            return 404, {"message": "Not found"}
        parts = parts[1:]
        if parts and parts[0] == "pals":  # newer alias of personas
            parts[0] = "personas"
        with self.state.lock:
            match (method, parts):
                case ("POST", ["personas"]):
                    return self._create_persona(body)
                case ("GET", ["personas"]):
                    data = list(self.state.personas.values())
                    return 200, {"data": data, "total_count": len(data)}
                case ("GET", ["personas", pid]):
                    if pid not in self.state.personas:
                        return 404, {"error": "Persona not found"}
                    return 200, self.state.personas[pid]
                case ("POST", ["conversations"]):
                    return self._create_conversation(body)
                case ("GET", ["conversations"]):
                    data = list(self.state.conversations.values())
                    return 200, {"data": data, "total_count": len(data)}
                case ("GET", ["conversations", cid]):
                    if cid not in self.state.conversations:
                        return 404, {"error": "Conversation not found"}
                    return 200, self.state.conversations[cid]
                case ("POST", ["conversations", cid, "end"]):
                    conv = self.state.conversations.get(cid)
                    if conv is None:
                        return 404, {"error": "Conversation not found"}
                    conv["status"] = "ended"
                    conv["updated_at"] = _now()
                    return 200, None
                case ("DELETE", ["conversations", cid]):
                    if self.state.conversations.pop(cid, None) is None:
                        return 404, {"error": "Conversation not found"}
                    return 204, None
                case _:
                    return 404, {"message": f"No route for {method} {path}"}

    def _create_persona(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict):
            return 400, {"error": "Request body must be a JSON object"}
        mode = body.get("pipeline_mode", "full")
        if mode not in ("full", "echo"):
            return 400, {"error": f"Invalid pipeline_mode: {mode}"}
        if mode == "full" and not body.get("system_prompt"):
            return 400, {"error": "system_prompt is required unless pipeline_mode is echo"}
        persona = {**body, "persona_id": _new_id("p"), "pipeline_mode": mode, "created_at": _now()}
        persona.setdefault("persona_name", None)
        self.state.personas[persona["persona_id"]] = persona
        return 200, {
            "persona_id": persona["persona_id"],
            "persona_name": persona["persona_name"],
            "created_at": persona["created_at"],
        }

    def _create_conversation(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict):
            return 400, {"error": "Request body must be a JSON object"}
        persona = self.state.personas.get(body.get("persona_id") or "")
        if persona is None:
            return 400, {"error": "Invalid persona_id"}
        replica_id = body.get("replica_id") or persona.get("default_replica_id")
        if not replica_id:
            return 400, {"error": "replica_id is required when the persona has no default_replica_id"}
        properties = body.get("properties", {})
        if not isinstance(properties, dict):
            return 400, {"error": "properties must be an object"}
        cid = _new_id("c")
        conv = {
            "conversation_id": cid,
            "conversation_name": body.get("conversation_name") or f"Conversation {cid}",
            "conversation_url": self.conversation_url.format(conversation_id=cid),
            "status": "active",
            "callback_url": body.get("callback_url"),
            "persona_id": persona["persona_id"],
            "replica_id": replica_id,
            "properties": properties,
            "created_at": _now(),
            **{k: body[k] for k in CREATE_OPTIONS if k in body},
        }
        self.state.conversations[cid] = conv
        answer = {
            k: conv[k]
            for k in (
                "conversation_id",
                "conversation_name",
                "conversation_url",
                "status",
                "callback_url",
                "created_at",
            )
        }
        if body.get("require_auth"):  # a private room: joined with this token (Tavus "Private Rooms")
            conv["meeting_token"] = answer["meeting_token"] = f"mtk-{uuid.uuid4().hex}"
        return 200, answer

    def _send(
        self, h: BaseHTTPRequestHandler, status: int, answer: Any, headers: dict[str, str] | None = None
    ) -> None:
        payload = b"" if answer is None or status == 204 else json.dumps(answer).encode()
        self._send_raw(h, status, payload, "application/json", headers)

    def _send_raw(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        payload: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        try:
            h.send_response(status)
            if payload:
                h.send_header("Content-Type", content_type)
            h.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                h.send_header(name, value)
            h.end_headers()
            if payload:
                h.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            pass


def unused_url() -> str:
    """A ``/v2`` base URL on a local port nothing listens on: connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v2"


@pytest.fixture(name="fake_tavus")
def fake_tavus_fixture() -> Iterator[FakeTavus]:
    """``fake_tavus``: a running fake Tavus, stopped after the test.

    A test module makes it available with ``from tests.fake_tavus import fake_tavus_fixture``
    (the fixture's name is ``fake_tavus``; the function's differs so that test arguments do not
    shadow an import)."""
    with FakeTavus() as tavus:
        yield tavus
