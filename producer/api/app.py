"""The HTTP API: a thin FastAPI face on :class:`~producer.client.EchoqClient`.

Two surfaces:

- ``POST /send_text_message`` takes, unchanged, the body of Tavus's echo quickstart (a
  ``conversation.echo`` or ``conversation.interrupt`` app message) and queues it as one
  utterance — or, for audio with ``done`` false, appends it to the stream its ``inference_id``
  names — so the quickstart's curl can point at echoq instead of its Flask script.
- ``/v1`` resources: conversations (open, show, close, interrupt, events as server-sent
  events), utterances (text, audio as base64, an http(s) URL or a multipart upload) and their
  status, streams (:mod:`producer.api.streams`). ``GET /healthz`` says whether the service is
  healthy without a token, and which workers report in only with one.

Every request except health and the docs needs ``Authorization: Bearer <token>``; the check is an
ASGI middleware, so a request without a valid token never reaches a handler or a body parser.
Request bodies are limited before they are read (413). Errors map at this boundary: bad input
422 with the field named, unknown conversation or utterance 404, Redis unreachable 503, Tavus
failing 502; anything unexpected is a JSON 500 without a traceback. Tokens are never logged.
Request and response bodies are the models in :mod:`producer.api.models`.

Run it with ``echoq api`` (see :mod:`producer.cli.api`) or ``uvicorn --factory producer.api:create_app``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from typing import Annotated, Any, Literal

import anyio
import redis
from fastapi import Depends, FastAPI, File, Form, Header, Path, Query, Request, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.errors import (
    BackendUnavailable,
    ConfigError,
    EchoqError,
)
from worker.logs import ms_since, step
from worker.settings import SAMPLE_RATES, Settings, get_settings

from ..client import EchoqClient
from ..streams import is_stream, quickstart_piece
from ..tavus import TavusClient, TavusConfigError, TavusHTTPError, TavusNotFound, TavusRejected
from .docs import ASSETS, DOC_PATHS, add_docs
from .errors import ERRORS, ApiError, Loc, invalid, mapped
from .models import (
    _CONV_ID,
    _UTT_ID,
    ClosedOut,
    CloseIn,
    ConversationIn,
    ConversationOut,
    EchoMessage,
    HealthOut,
    InterruptOut,
    Queued,
    SendResult,
    UtteranceIn,
    UtteranceOut,
)
from .schedules import register as register_schedules
from .streams import register as register_streams
from .streams import stream_errors

__all__ = ["create_app", "body_limit_for", "OPEN_PATHS"]

logger = logging.getLogger("echoq.api")

#: paths served without a token: health and the API's own documentation (and its assets)
OPEN_PATHS = frozenset({"/healthz"}) | DOC_PATHS
OPEN_PREFIXES = (f"{ASSETS}/",)
#: room for JSON or multipart framing around the largest audio a request may carry
_BODY_SLACK = 1024 * 1024
_EVENT_ID_RE = re.compile(r"^\d{1,20}(-\d{1,20})?$")


def body_limit_for(settings: Settings) -> int:
    """The largest request body: the biggest allowed audio as base64, plus framing."""
    return math.ceil(settings.max_audio_bytes / 3) * 4 + _BODY_SLACK


# --- errors -------------------------------------------------------------------------------------


def _tavus_error(exc: Exception, created: bool) -> ApiError:
    """Tavus's refusal of the caller's persona or conversation is theirs to fix (422 or 404);
    any other failure of Tavus is a bad gateway (502). Messages are Tavus's, already scrubbed."""
    if isinstance(exc, TavusConfigError):
        return ApiError(503, f"Tavus is not configured: {exc}")
    if isinstance(exc, TavusHTTPError):
        said = exc.message or f"HTTP {exc.status}"
        if isinstance(exc, TavusNotFound) and not created:
            return ApiError(404, f"Tavus has no such conversation: {said}")
        if isinstance(exc, TavusRejected | TavusNotFound) and created:
            field = "replica_id" if "replica" in said.lower() else "persona_id"
            return invalid(("body", field), f"Tavus refused the conversation: {said}")
        return ApiError(502, f"Tavus failed: {said}")
    return ApiError(502, f"Tavus failed: {type(exc).__name__}")


# --- middleware ---------------------------------------------------------------------------------


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


def _bearer_matches(tokens: Sequence[bytes], header: bytes | None) -> bool:
    """Whether an Authorization header carries one of ``tokens``, compared in constant time."""
    if not header:
        return False
    scheme, _, given = header.partition(b" ")
    if scheme.lower() != b"bearer" or not given.strip():
        return False
    given = given.strip()
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given, token)
    return ok


class _BearerGate:
    """Answers 401 before the app sees a request without a valid bearer token.

    Tokens are compared in constant time against every configured token; neither the header
    nor the token is ever logged or echoed.
    """

    def __init__(self, app: ASGIApp, tokens: Sequence[str] | None) -> None:
        self.app = app
        self.tokens = [t.encode() for t in tokens] if tokens is not None else None

    def allowed(self, header: bytes | None) -> bool:
        return self.tokens is None or _bearer_matches(self.tokens, header)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", []) if k == b"authorization"), None)
        if not self.allowed(header):
            step(logger, "api.unauthorized", logging.WARNING, method=scope.get("method"), path=scope["path"],
                 reason="missing" if header is None else "invalid")
            await _send_json(send, 401, {"detail": "a valid bearer token is required (Authorization: Bearer <token>)"},
                             [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class _BodyLimit:
    """413 for bodies over ``limit``: at once from Content-Length, else while the body streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _too_large(self) -> ApiError:
        return ApiError(413, f"request body is over the limit of {self.limit} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            status = 413 if length.isdigit() else 400
            await _send_json(send, status, {"detail": self._too_large().detail if status == 413 else "bad Content-Length"})
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # An HTTPException passes through FastAPI's body parsing as it is: a 413.
                    raise self._too_large()
            return message

        await self.app(scope, counted, send)


# --- the app ------------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="one of the tokens in ECHOQ_API_TOKENS")

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no such conversation (or it is not open)"}}

ConvId = Annotated[str, Path(pattern=_CONV_ID, description="conversation id",
                             openapi_examples={"demo": {"value": "demo"}})]


def create_app(
    *,
    tokens: Sequence[str] | None = None,
    auth: bool = True,
    settings: Settings | None = None,
    redis_url: str | None = None,
    client: EchoqClient | None = None,
    tavus_factory: Callable[[], TavusClient] | None = None,
    max_body_bytes: int | None = None,
    stream_max_s: float | None = 3600.0,
    stream_block_ms: int = 1000,
) -> FastAPI:
    """Build the API.

    ``tokens`` are the accepted bearer tokens (default: ``ECHOQ_API_TOKENS``); with none and
    ``auth`` true this raises :class:`ConfigError`, and ``auth=False`` serves without tokens.
    ``client`` (or ``redis_url``) is the producer client every handler goes through;
    ``tavus_factory`` builds the Tavus client (default: from settings). ``max_body_bytes``
    defaults to :func:`body_limit_for`. An event stream ends after ``stream_max_s`` seconds
    (clients reconnect with ``Last-Event-ID``); ``stream_block_ms`` is how long one read waits.
    """
    settings = settings or get_settings()
    if not auth:
        accepted: list[str] | None = None
    else:
        accepted = [t.strip() for t in (tokens if tokens is not None else settings.api_token_list) if t.strip()]
        if not accepted:
            raise ConfigError("no API tokens: set ECHOQ_API_TOKENS (comma-separated), or run without auth explicitly")
    echoq = client or EchoqClient(redis_url, settings=settings)
    make_tavus = tavus_factory or partial(TavusClient.from_settings, settings)
    limit = max_body_bytes or body_limit_for(settings)

    app = FastAPI(
        title="echoq",
        version="0.1.0",
        summary="Script what a Tavus replica says: queue text and audio into echo-mode conversations.",
        description="Every endpoint except `/healthz` needs `Authorization: Bearer <token>`.",
        docs_url=None,  # add_docs serves both pages from local assets instead of a CDN
        redoc_url=None,
    )
    add_docs(app)
    app.state.echoq = echoq
    app.state.handler_calls = Counter()  # requests that reached a handler, by route name (bounded)

    def guard(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        """Runs for every authenticated route, after the gate let the request through."""
        # The gate has already refused bad tokens; this records that a handler was reached.
        if accepted is not None and (creds is None or not any(
                hmac.compare_digest(creds.credentials.encode(), t.encode()) for t in accepted)):
            raise ApiError(401, "a valid bearer token is required")
        route = request.scope.get("route")
        request.app.state.handler_calls[getattr(route, "name", "?")] += 1

    protected = [Depends(guard)]

    # -- error rendering ----------------------------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # Only where and why: never echo the input back (it may be megabytes of audio).
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI answers 400 "error parsing the body" when a body is not UTF-8 (or a form cannot
        # be parsed); that is bad input like any other, so it is a 422 naming the body.
        if exc.status_code == 400 and exc.__cause__ is not None and not isinstance(exc, ApiError):
            return JSONResponse({"detail": [_unparseable(exc.__cause__)]}, status_code=422)
        return await http_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        step(logger, "api.error", logging.ERROR, method=request.method, path=request.url.path, error=type(exc).__name__)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the API log"}, status_code=500)

    # -- Tavus quickstart compatibility --------------------------------------------------------

    @app.post("/send_text_message", response_model=SendResult, dependencies=protected, tags=["tavus quickstart"],
              responses={**ERRORS, **_NOT_FOUND})
    def send_text_message(message: EchoMessage) -> SendResult:
        """Queue the body of Tavus's echo quickstart as it is: a text or audio echo becomes one
        utterance (audio is raw PCM at `sample_rate`, converted and chunked as usual), an
        interrupt interrupts. The caller's `inference_id`, when given, is used on the wire.
        Audio with `done` false streams: every request with the same `inference_id` appends to
        one utterance, which is spoken as it arrives, and the one with `done` true finishes it."""
        with mapped(("body", "conversation_id")):
            # Tavus's quickstart names Tavus's conversation id, which may not be echoq's
            cid = echoq.by_wire_id(message.conversation_id)
        if message.event_type == "conversation.interrupt":
            with mapped():
                cancelled = echoq.interrupt(cid)
            return SendResult(conversation_id=cid, state="interrupted", cancelled=cancelled)
        props = message.properties
        if props is None:
            raise invalid(("body", "properties"), "properties are required for conversation.echo")
        streaming = props.done in (False, "false")
        loc: Loc = ("body", "properties")
        fields = {"inference_id": (*loc, "inference_id"), "conversation id": ("body", "conversation_id"),
                  "sample_rate": (*loc, "sample_rate"), "microphone mode": ("body", "conversation_id")}
        if props.modality == "text" and streaming:
            raise invalid((*loc, "done"), "text cannot be streamed: Tavus documents a text echo only as one whole "
                                          "message with done true; stream audio, or send the whole text")
        if props.modality == "audio" and props.audio is not None and (streaming or is_stream(echoq, props.inference_id)):
            # one request of a series under one inference_id: the first opens a stream, done true finishes it
            if not props.inference_id:
                raise invalid((*loc, "inference_id"), "streaming over several requests (done false) needs an "
                                                      "inference_id: the requests that share it are one utterance")
            pcm = _b64((*loc, "audio"), props.audio)
            with stream_errors((*loc, "audio"), fields):
                uid = quickstart_piece(echoq, cid, pcm, props.sample_rate or 16000, props.inference_id, not streaming)
            return SendResult(conversation_id=cid, utterance_id=uid, inference_id=props.inference_id,
                              state="streaming" if streaming else "finished")
        if props.modality == "text":
            if props.text is None:
                raise invalid((*loc, "text"), "text is required when modality is text")
            with mapped((*loc, "text"), fields):
                uid = echoq.say(cid, props.text, inference_id=props.inference_id)
        else:
            if props.audio is None:
                raise invalid((*loc, "audio"), "audio is required when modality is audio")
            pcm = _b64((*loc, "audio"), props.audio)
            rate = props.sample_rate or 16000
            with mapped((*loc, "audio"), fields):
                uid = echoq.play(cid, pcm, format="raw", source_rate=rate,
                                 sample_rate=rate if rate in SAMPLE_RATES else 24000, inference_id=props.inference_id)
        return SendResult(conversation_id=cid, utterance_id=uid, inference_id=props.inference_id or uid, state="queued")

    # -- conversations -------------------------------------------------------------------------

    @app.post("/v1/conversations", status_code=201, response_model=ConversationOut, dependencies=protected,
              tags=["conversations"], responses={**ERRORS, 502: {"description": "Tavus failed"}})
    def open_conversation(body: ConversationIn) -> ConversationOut:
        """Open a conversation so a worker joins its room; with `persona_id`, create it on Tavus first."""
        tavus_info: dict[str, Any] | None = None
        if body.persona_id is not None:
            try:
                with make_tavus() as tavus:
                    created = tavus.create_conversation(body.persona_id, replica_id=body.replica_id,
                                                        conversation_name=body.conversation_name,
                                                        custom_greeting=body.custom_greeting,
                                                        conversational_context=body.conversational_context)
            except (TavusConfigError, TavusHTTPError) as exc:
                raise _tavus_error(exc, created=True) from exc
            cid, url = str(created.get("conversation_id") or ""), str(created.get("conversation_url") or "")
            if not cid or not url:
                raise ApiError(502, "Tavus answered without conversation_id or conversation_url")
            tavus_info = {k: created.get(k) for k in ("conversation_id", "conversation_url", "status")}
        else:
            cid, url = str(body.conversation_id), str(body.url)
        try:
            token = body.meeting_token.get_secret_value() if body.meeting_token is not None else None
            with mapped(("body",), {"Tavus conversation id": ("body", "tavus_conversation_id"),
                                    "conversation id": ("body", "conversation_id"), "url": ("body", "url")}):
                echoq.open(cid, url, mode=body.mode, tavus_conversation_id=body.tavus_conversation_id,
                           meeting_token=token)
                conv = echoq.conversation(cid)
        except ConfigError as exc:  # a token and no ECHOQ_SECRET_KEY to seal it with: nothing was written
            raise ApiError(503, f"echoq cannot keep a meeting token: {exc}") from exc
        except ApiError as exc:
            if tavus_info is not None and isinstance(exc.detail, str):
                exc.detail += f" (the conversation was created on Tavus as {cid}: open it with its id and url)"
            raise
        return ConversationOut(**conv, tavus=tavus_info)

    @app.get("/v1/conversations/{conversation_id}", response_model=ConversationOut, dependencies=protected,
             tags=["conversations"], responses={**ERRORS, **_NOT_FOUND})
    def show_conversation(conversation_id: ConvId) -> ConversationOut:
        """A conversation's owner, state, backlog and current utterance."""
        with mapped(("path", "conversation_id")):
            return ConversationOut(**echoq.conversation(conversation_id))

    @app.post("/v1/conversations/{conversation_id}/close", status_code=202, response_model=ClosedOut,
              dependencies=protected, tags=["conversations"],
              responses={**ERRORS, **_NOT_FOUND, 502: {"description": "Tavus failed"}})
    def close_conversation(conversation_id: ConvId, body: CloseIn | None = None) -> ClosedOut:
        """Stop taking utterances; the owner sends what is queued, then leaves. With
        `end_on_tavus`, the conversation is ended on Tavus first (nothing changes here if that fails)."""
        end = bool(body and body.end_on_tavus)
        with mapped(("path", "conversation_id")):
            state = echoq.conversation(conversation_id).get("state", "")
        if end:
            try:
                with make_tavus() as tavus:
                    tavus.end_conversation(conversation_id)
            except (TavusConfigError, TavusHTTPError) as exc:
                raise _tavus_error(exc, created=False) from exc
        if state == "open":
            with mapped(("path", "conversation_id")):
                echoq.close(conversation_id)
                state = echoq.conversation(conversation_id).get("state", "closing")
        return ClosedOut(conversation_id=conversation_id, state=state, ended_on_tavus=end)

    @app.post("/v1/conversations/{conversation_id}/interrupt", response_model=InterruptOut, dependencies=protected,
              tags=["conversations"], responses={**ERRORS, **_NOT_FOUND})
    def interrupt(conversation_id: ConvId) -> InterruptOut:
        """Stop the utterance being sent and cancel the queued ones."""
        with mapped(("path", "conversation_id")):
            return InterruptOut(conversation_id=conversation_id, cancelled=echoq.interrupt(conversation_id))

    @app.get("/v1/conversations/{conversation_id}/events", dependencies=protected, tags=["conversations"],
             response_class=StreamingResponse,
             responses={**ERRORS, **_NOT_FOUND,
                        200: {"description": "server-sent events: `id:` the event id, `data:` its JSON",
                              "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    def events(
        request: Request,
        conversation_id: ConvId,
        after: Annotated[str, Query(pattern=_EVENT_ID_RE.pattern, description="send events after this id")] = "0-0",
        limit: Annotated[int | None, Query(ge=1, le=100_000, description="end the stream after this many")] = None,
        last_event_id: Annotated[str | None, Header(description="resume after this id (wins over `after`)")] = None,
    ) -> StreamingResponse:
        """Delivery and replica events of a conversation as server-sent events, from the oldest
        kept (or after `after` / `Last-Event-ID`) and then live."""
        if last_event_id is not None:
            if not _EVENT_ID_RE.match(last_event_id.strip()):
                raise invalid(("header", "last-event-id"), "Last-Event-ID must be an event id such as 1700000000000-0")
            after = last_event_id.strip()
        with mapped(("path", "conversation_id")):
            echoq.conversation(conversation_id)  # 404 before the stream starts
        stream = _event_stream(echoq, conversation_id, after, limit, stream_max_s, stream_block_ms)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- utterances ----------------------------------------------------------------------------

    @app.post("/v1/conversations/{conversation_id}/utterances", status_code=202, response_model=Queued,
              dependencies=protected, tags=["utterances"], responses={**ERRORS, **_NOT_FOUND})
    def add_utterance(conversation_id: ConvId, body: UtteranceIn) -> Queued:
        """Queue text, or audio given as base64 or as an http(s) URL echoq fetches."""
        fields = {"inference_id": ("body", "inference_id"), "utterance id": ("body", "id"),
                  "sample_rate": ("body", "sample_rate"), "source_rate": ("body", "source_rate"),
                  "microphone mode": ("path", "conversation_id")}
        if body.text is not None:
            with mapped(("body", "text"), fields):
                uid = echoq.say(conversation_id, body.text, utterance_id=body.id, inference_id=body.inference_id)
            return Queued(utterance_id=uid, conversation_id=conversation_id)
        if body.audio_base64 is not None:
            source: bytes | str = _b64(("body", "audio_base64"), body.audio_base64)
            where: Loc = ("body", "audio_base64")
        else:
            source, where = str(body.audio_url), ("body", "audio_url")
        with mapped(where, fields):
            uid = echoq.play(conversation_id, source, sample_rate=body.sample_rate, source_rate=body.source_rate,
                             channels=body.channels, format=body.format, utterance_id=body.id,
                             inference_id=body.inference_id)
        return Queued(utterance_id=uid, conversation_id=conversation_id)

    @app.post("/v1/conversations/{conversation_id}/utterances/audio", status_code=202, response_model=Queued,
              dependencies=protected, tags=["utterances"], responses={**ERRORS, **_NOT_FOUND})
    def upload_audio(
        conversation_id: ConvId,
        audio: Annotated[UploadFile, File(description="an audio file (wav, mp3, ogg, flac, m4a, webm) or raw PCM")],
        sample_rate: Annotated[Literal[16000, 24000] | None, Form()] = None,
        format: Annotated[str | None, Form(max_length=16, pattern=r"^[A-Za-z0-9]+$")] = None,
        source_rate: Annotated[int | None, Form(ge=4000, le=192000)] = None,
        channels: Annotated[int, Form(ge=1, le=8)] = 1,
        id: Annotated[str | None, Form(pattern=_UTT_ID)] = None,
        inference_id: Annotated[str | None, Form(pattern=_UTT_ID)] = None,
    ) -> Queued:
        """Queue an uploaded audio file (multipart/form-data, field `audio`)."""
        data = audio.file.read(settings.max_audio_bytes + 1)
        fields = {"inference_id": ("body", "inference_id"), "utterance id": ("body", "id"),
                  "sample_rate": ("body", "sample_rate"), "source_rate": ("body", "source_rate"),
                  "microphone mode": ("path", "conversation_id")}
        with mapped(("body", "audio"), fields):
            uid = echoq.play(conversation_id, data, sample_rate=sample_rate, source_rate=source_rate,
                             channels=channels, format=format, utterance_id=id, inference_id=inference_id)
        return Queued(utterance_id=uid, conversation_id=conversation_id)

    @app.get("/v1/utterances/{utterance_id}", response_model=UtteranceOut, dependencies=protected,
             tags=["utterances"], responses={**ERRORS, 404: {"description": "no such utterance"}})
    def show_utterance(utterance_id: Annotated[str, Path(pattern=_UTT_ID)]) -> UtteranceOut:
        """An utterance's state, chunk counts, timings and error."""
        with mapped(("path", "utterance_id")):
            return UtteranceOut(**echoq.status(utterance_id))


    register_schedules(app, protected, echoq)
    register_streams(app, protected, echoq)

    # -- health --------------------------------------------------------------------------------

    @app.get("/healthz", response_model=HealthOut, response_model_exclude_none=True, tags=["health"],
             responses={503: {"model": HealthOut, "description": "Redis is unreachable"}})
    def health(request: Request) -> Any:
        """Whether the service is healthy (no token needed). With a valid token, also whether Redis
        answers and which workers reported in the last 30 seconds."""
        # Worker names are host names and Redis errors name addresses: only a token holder sees them.
        detailed = accepted is not None and _bearer_matches(
            [t.encode() for t in accepted], request.headers.get("authorization", "").encode())
        report = echoq.health()
        if not report.get("redis"):
            body = HealthOut(status="unavailable")
            if detailed:
                body = HealthOut(status="unavailable", redis=False, workers=[],
                                 detail=f"Redis is unreachable: {report.get('error', '')}".rstrip(": "))
            return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
        workers = list(report.get("workers", []))
        status: Literal["ok", "degraded"] = "ok" if workers else "degraded"
        if not detailed:
            return HealthOut(status=status)
        return HealthOut(status=status, redis=True, workers=workers,
                         detail=None if workers else "no worker reported in the last 30 seconds")

    # Middleware wraps outside in: the token gate first, then the body limit.
    app.add_middleware(_BodyLimit, limit=limit)
    app.add_middleware(_BearerGate, tokens=accepted)
    app.add_middleware(_RequestLog)
    return app


class _RequestLog:
    """One line per request: method, path, status, duration. Never headers, never bodies."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        status = [0]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            step(logger, "api.request", method=scope.get("method"), path=scope["path"], status=status[0],
                 duration_ms=ms_since(t0))


def _unparseable(cause: BaseException) -> dict[str, Any]:
    """The 422 entry for a body FastAPI could not parse: where and why, never the bytes."""
    if isinstance(cause, UnicodeDecodeError):
        return {"loc": ["body"], "msg": f"the body is not valid UTF-8 (byte {cause.start})", "type": "utf8_invalid"}
    return {"loc": ["body"], "msg": f"the body could not be parsed ({type(cause).__name__})", "type": "body_invalid"}


def _b64(loc: Loc, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid(loc, "is not valid base64") from exc


async def _event_stream(echoq: EchoqClient, conversation_id: str, after: str, limit: int | None,
                        max_s: float | None, block_ms: int) -> AsyncIterator[str]:
    """SSE frames of the conversation's events; a comment line keeps idle connections open."""
    deadline = None if max_s is None else time.monotonic() + max_s
    sent = 0
    yield "retry: 1000\n\n"
    while deadline is None or time.monotonic() < deadline:
        try:
            batch = await anyio.to_thread.run_sync(
                partial(echoq.events, conversation_id, after, block_ms=block_ms, count=100))
        except (EchoqError, redis.RedisError) as exc:
            reason = str(exc) if isinstance(exc, BackendUnavailable) else type(exc).__name__
            yield f"event: error\ndata: {json.dumps({'detail': reason})}\n\n"
            return
        if not batch:
            yield ": idle\n\n"
            continue
        for event_id, event in batch:
            yield f"id: {event_id}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"
            after = event_id
            sent += 1
            if limit is not None and sent >= limit:
                return
