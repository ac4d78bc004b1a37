"""echoq's errors as HTTP answers, shared by every route module of the API.

Bad input is 422 with the field named in ``loc``, an unknown conversation or utterance 404,
Redis unreachable 503.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import redis
from fastapi.exceptions import HTTPException

from worker.errors import AudioError, BackendUnavailable, InvalidInput, UnknownConversation

Loc = tuple[str | int, ...]

#: the error answers every authenticated route documents
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or invalid bearer token"},
    413: {"description": "request body too large"},
    422: {"description": "invalid input; `loc` names the field"},
    503: {"description": "Redis is unreachable"},
}


class ApiError(HTTPException):
    """An error with its status and JSON ``detail``; also raised from inside body reading."""


def invalid(loc: Loc, msg: str) -> ApiError:
    return ApiError(422, [{"loc": list(loc), "msg": msg, "type": "value_error"}])


@contextmanager
def mapped(loc: Loc = ("body",), fields: Mapping[str, Loc] | None = None) -> Iterator[None]:
    """Turn echoq's errors into HTTP errors; ``fields`` maps words in a message to the field it names."""
    try:
        yield
    except UnknownConversation as exc:
        raise ApiError(404, str(exc)) from exc
    except (InvalidInput, AudioError) as exc:
        msg = str(exc)
        if msg.startswith("no utterance"):
            raise ApiError(404, msg) from exc
        where = next((v for k, v in (fields or {}).items() if k in msg), loc)
        raise invalid(where, msg) from exc
    except BackendUnavailable as exc:
        raise ApiError(503, str(exc)) from exc
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise ApiError(503, f"Redis is unreachable: {exc}") from exc
    except redis.RedisError as exc:
        raise ApiError(503, f"Redis refused the request: {type(exc).__name__}") from exc
