"""The ``/v1/conversations/{id}/streams`` routes: open a stream, append pieces, finish it.

Pieces are request bodies of raw bytes (``application/octet-stream``): raw s16le PCM at the
stream's ``source_rate``, or encoded bytes when the stream was opened with a ``format``. A body
may be sent chunked (``Transfer-Encoding: chunked``, or any body a client streams): it is
appended as it arrives, one piece per received part (raw PCM in whole frames), so one long
request can carry a whole live stream. Progress of each piece on the wire is on the
conversation's event stream (``stream.piece`` events).

Errors: no such stream 404, a stream that takes no more pieces (finished, interrupted, ended
idle, cut) 409, a piece that takes the stream over the limits 413 (the stream is cut on the
wire), bad pieces 422.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Annotated, Any, Literal

import anyio
from fastapi import FastAPI, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from ..client import EchoqClient
from ..streams import (
    PIPE_PIECE_BYTES,
    Appended,
    StreamClosed,
    StreamCut,
    StreamInfo,
    append,
    info_of,
)
from .errors import ERRORS, ApiError, Loc, invalid, mapped
from .models import _CONV_ID, _UTT_ID

__all__ = ["register", "StreamIn", "StreamOut", "PiecesOut", "stream_errors"]

_RAW_BODY: dict[str, Any] = {"requestBody": {"required": False, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"description": "no such conversation or stream"},
    409: {"description": "the stream takes no more pieces (finished, interrupted, ended idle or cut)"},
    413: {"description": "the stream went over the size or length limit and was cut"},
}

ConvId = Annotated[str, Path(pattern=_CONV_ID, description="conversation id")]
UttId = Annotated[str, Path(pattern=_UTT_ID, description="the stream's utterance id")]


class StreamIn(BaseModel):
    """Open a stream: raw PCM at ``source_rate`` (default: ``sample_rate``), or encoded bytes with ``format``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"sample_rate": 24000}, {"sample_rate": 24000, "format": "mp3"}]})

    sample_rate: Literal[16000, 24000] | None = Field(default=None, description="rate sent to the replica")
    source_rate: int | None = Field(default=None, ge=4000, le=192000, description="rate of raw PCM pieces")
    channels: int = Field(default=1, ge=1, le=8, description="channels of raw PCM pieces")
    format: str | None = Field(default=None, max_length=16, pattern=r"^[A-Za-z0-9]+$",
                               description="raw (default) for s16le PCM; an ffmpeg format name, or auto, for encoded pieces")
    id: str | None = Field(default=None, pattern=_UTT_ID, description="utterance id (default: new); idempotent")
    inference_id: str | None = Field(default=None, pattern=_UTT_ID, description="inference_id on the wire")


class StreamOut(BaseModel):
    utterance_id: str
    conversation_id: str
    state: str = "open"


class PiecesOut(BaseModel):
    """What an append did: the pieces and bytes the stream holds now, and whether it is finished."""

    utterance_id: str
    pieces: int
    bytes: int
    finished: bool


@contextmanager
def stream_errors(loc: Loc = ("body",), fields: Mapping[str, Loc] | None = None) -> Iterator[None]:
    """Stream refusals as HTTP answers (404, 409, 413), the rest as :func:`mapped` does."""
    if fields is None:
        fields = {"microphone": ("path", "conversation_id"), "sample_rate": ("body", "sample_rate"),
                  "source_rate": ("body", "source_rate"), "inference_id": ("body", "inference_id")}
    with mapped(loc, fields):
        try:
            yield
        # before mapped() sees them: it would make every refusal a 422
        except StreamClosed as exc:
            raise ApiError(404 if str(exc).startswith("no stream") else 409, str(exc)) from exc
        except StreamCut as exc:
            raise ApiError(413, str(exc)) from exc


def register(app: FastAPI, protected: Sequence[Any], echoq: EchoqClient) -> None:
    """Add the stream routes to ``app``, each behind ``protected``."""
    deps = list(protected)
    tags: list[Any] = ["streams"]

    @app.post("/v1/conversations/{conversation_id}/streams", status_code=201, response_model=StreamOut,
              dependencies=deps, tags=tags, responses=_RESPONSES)
    def open_(conversation_id: ConvId, body: StreamIn) -> StreamOut:
        """Open a stream: an utterance whose audio comes in pieces. It takes its place in the
        conversation's order now; the utterances queued after it wait until it is finished."""
        with stream_errors():
            info = echoq.stream(conversation_id, sample_rate=body.sample_rate, source_rate=body.source_rate,
                                channels=body.channels, format=body.format, utterance_id=body.id,
                                inference_id=body.inference_id).info
        return StreamOut(utterance_id=info.utterance_id, conversation_id=conversation_id)

    async def _pieces(request: Request, conversation_id: str, utterance_id: str, finish: bool,
                      rate: int | None) -> PiecesOut:
        with stream_errors(("path", "utterance_id")):
            info = await anyio.to_thread.run_sync(partial(info_of, echoq, utterance_id))
        if info.conversation_id != conversation_id:
            raise ApiError(404, f"no stream {utterance_id!r} in conversation {conversation_id!r}")
        frame = 2 * info.channels if info.raw else 1
        largest = PIPE_PIECE_BYTES - PIPE_PIECE_BYTES % frame
        held, done = b"", Appended(0, 0)
        last = b""  # with finish, the body's last piece goes with it, so its last chunk carries done
        async for part in request.stream():
            held += part
            whole = len(held) - len(held) % frame
            while whole:  # a large part goes in pieces of a sensible size
                size = min(whole, largest)
                if finish:
                    if last:
                        done = await _append(info, last, False, rate)
                    last = held[:size]
                else:
                    done = await _append(info, held[:size], False, rate)
                held, whole = held[size:], whole - size
        if held:
            raise _bad(f"the body ends inside a sample frame ({len(held)} byte(s) left over)")
        if finish:
            done = await _append(info, last, True, rate)
        elif done.pieces == 0:
            raise _bad("the body is empty: send audio, or finish the stream")
        return PiecesOut(utterance_id=utterance_id, pieces=done.pieces, bytes=done.bytes, finished=finish)

    async def _append(info: StreamInfo, piece: bytes, finish: bool, rate: int | None) -> Appended:
        with stream_errors():
            return await anyio.to_thread.run_sync(partial(append, echoq, info, piece, finish=finish, rate=rate))

    @app.post("/v1/conversations/{conversation_id}/streams/{utterance_id}/pieces", response_model=PiecesOut,
              dependencies=deps, tags=tags, responses=_RESPONSES, openapi_extra=_RAW_BODY)
    async def pieces(
        request: Request,
        conversation_id: ConvId,
        utterance_id: UttId,
        finish: Annotated[bool, Query(description="this body is the end of the stream")] = False,
        rate: Annotated[int | None, Query(ge=4000, le=192000, description="rate of these raw PCM pieces, checked")] = None,
    ) -> PiecesOut:
        """Append the body (raw bytes, may be chunked) to the stream as it arrives."""
        return await _pieces(request, conversation_id, utterance_id, finish, rate)

    @app.post("/v1/conversations/{conversation_id}/streams/{utterance_id}/finish", response_model=PiecesOut,
              dependencies=deps, tags=tags, responses=_RESPONSES, openapi_extra=_RAW_BODY)
    async def finish(
        request: Request,
        conversation_id: ConvId,
        utterance_id: UttId,
        rate: Annotated[int | None, Query(ge=4000, le=192000, description="rate of the last raw PCM piece, checked")] = None,
    ) -> PiecesOut:
        """Finish the stream; a body, if any, is its last piece."""
        return await _pieces(request, conversation_id, utterance_id, True, rate)


def _bad(msg: str) -> ApiError:
    return invalid(("body",), msg)
