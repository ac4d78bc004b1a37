"""Tavus REST client: echo personas and conversations over ``https://tavusapi.com/v2``.

Every call has a timeout. Connection errors, timeouts, 429 and 5xx are retried with exponential
backoff and jitter (a ``Retry-After`` header wins, capped by ``backoff_max``); any other 4xx is
raised at once. Errors carry Tavus's own message and never the API key, and the key is never
logged: the one log line per HTTP attempt holds method, path, status, attempt and duration.

    EchoqError
    └── TavusError
        ├── TavusConfigError        no API key, or a base URL that cannot work      (permanent)
        └── TavusHTTPError          a call to Tavus failed; ``status`` and ``message``
            ├── TavusAuthError      401 / 403: the key is wrong or lacks the right  (permanent)
            ├── TavusNotFound       404: no such persona or conversation            (permanent)
            ├── TavusRejected       any other 4xx: Tavus refused the request        (permanent)
            ├── TavusConcurrencyLimit  400 "maximum concurrent conversations", still
            │                       after the retries                               (retryable)
            ├── TavusRateLimited    429, still after the retries                    (retryable)
            ├── TavusServerError    5xx, still after the retries                    (retryable)
            └── TavusUnavailable    no answer (connection error, timeout); status None (retryable)

The permanent and retryable branches are also :class:`~worker.errors.PermanentError` and
:class:`~worker.errors.RetryableError`, so callers can handle Tavus errors like any other.

Which calls are retried. Reading (GET), ending (``POST …/end``) and deleting are idempotent and
retried on every transient failure. The two creating calls (``POST /personas`` and
``POST /conversations``) are retried only when Tavus cannot have acted on the request: a
connection that never opened (refused, DNS, connect timeout), a 429, or Tavus's 400 "maximum
concurrent conversations" (a refusal before any work, which lasts until one of the account's
conversations ends: it is waited out with the same backoff). After a 5xx, a read timeout or a dropped connection the request may have created a
persona or a conversation (a conversation is a billed room), so the error is raised instead of
risking a duplicate; the caller can list or look up before trying again.
"""

from __future__ import annotations

import email.utils
import functools
import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import requests
import urllib3.exceptions as u3
from pydantic import SecretStr

from worker.errors import ConfigError, EchoqError, PermanentError, RetryableError
from worker.logs import step
from worker.text import check_text

if TYPE_CHECKING:
    from worker.settings import Settings

__all__ = [
    "DEFAULT_BASE_URL",
    "TavusAuthError",
    "TavusClient",
    "TavusConcurrencyLimit",
    "TavusConfigError",
    "TavusError",
    "TavusHTTPError",
    "TavusNotFound",
    "TavusRateLimited",
    "TavusRejected",
    "TavusServerError",
    "TavusUnavailable",
]

DEFAULT_BASE_URL = "https://tavusapi.com/v2"
API_KEY_HEADER = "x-api-key"
_MAX_MESSAGE_CHARS = 300
_REDACTED = "[redacted]"
# Tavus answers a create over the account's concurrency limit with a 400 saying so.
_CONCURRENCY = re.compile(r"concurrent conversation", re.IGNORECASE)

logger = logging.getLogger("echoq.tavus")


# --- errors -------------------------------------------------------------------------------------


class TavusError(EchoqError):
    """Root of every error the Tavus client raises."""


class TavusConfigError(TavusError, ConfigError):
    """The client cannot be built: no API key, or a base URL that is not http(s)."""


class TavusHTTPError(TavusError):
    """A call to Tavus failed; ``status`` is the HTTP status (None when nothing came back).

    ``message`` is Tavus's own message when it sent one (the ``message`` or ``error`` field of
    its JSON body, else the body text), already scrubbed of the API key.
    """

    def __init__(self, message: str, *, status: int | None = None, method: str = "", path: str = "") -> None:
        self.message = message
        self.status = status
        self.method = method
        self.path = path
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = f"{self.method} {self.path}".strip()
        what = f"HTTP {self.status}" if self.status is not None else "no response"
        prefix = f"Tavus {where}: {what}" if where else f"Tavus: {what}"
        return f"{prefix}: {self.message}" if self.message else prefix

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields survive pickling (Celery results, multiprocessing).
        rebuild = functools.partial(type(self), status=self.status, method=self.method, path=self.path)
        return (rebuild, (self.message,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, method={self.method!r}, path={self.path!r}, message={self.message!r})"


class TavusAuthError(TavusHTTPError, PermanentError):
    """401 or 403: the API key is wrong, revoked, or not allowed this call."""


class TavusNotFound(TavusHTTPError, PermanentError):
    """404: no such persona or conversation."""


class TavusRejected(TavusHTTPError, PermanentError):
    """Any other 4xx: Tavus refused the request as it stands (bad field, conflict, ...)."""


class TavusConcurrencyLimit(TavusHTTPError, RetryableError):
    """400 "maximum concurrent conversations" on every attempt: end a conversation, or try later."""


class TavusRateLimited(TavusHTTPError, RetryableError):
    """429 on every attempt: Tavus is rate limiting this key; try again later."""


class TavusServerError(TavusHTTPError, RetryableError):
    """5xx on every attempt: Tavus is failing; try again later."""


class TavusUnavailable(TavusHTTPError, RetryableError):
    """No answer from Tavus on any attempt: connection refused or dropped, DNS, timeout."""


def _error_for_status(status: int) -> type[TavusHTTPError]:
    if status in (401, 403):
        return TavusAuthError
    if status == 404:
        return TavusNotFound
    if status == 429:
        return TavusRateLimited
    if 400 <= status < 500:
        return TavusRejected
    if status >= 500:
        return TavusServerError
    return TavusHTTPError  # 1xx/3xx: redirects are not followed, so the key never leaves the host


# --- client -------------------------------------------------------------------------------------


class TavusClient:
    """A small synchronous client for the Tavus v2 REST API (personas and conversations).

    ``api_key`` is required (a ``str`` or a pydantic ``SecretStr``); ``base_url`` defaults to
    :data:`DEFAULT_BASE_URL`. ``timeout`` applies to connecting and to each read; ``max_retries``
    is the number of retries after the first attempt; backoff doubles from ``backoff_base`` up to
    ``backoff_max`` seconds with jitter. ``session`` lets the caller share a connection pool (it
    is then not closed by :meth:`close`). ``sleep`` waits between attempts; tests pass their own.

    Use :meth:`from_settings` to build one from echoq's settings (``TAVUS_API_KEY``,
    ``ECHOQ_TAVUS_BASE_URL``).
    """

    def __init__(
        self,
        api_key: str | SecretStr | None = None,
        base_url: str | None = None,
        *,
        timeout: float = 10.0,
        max_retries: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        key = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
        if not key or not key.strip():
            raise TavusConfigError(
                "no Tavus API key: set TAVUS_API_KEY in the environment (or .env), or pass api_key"
            )
        # Held as a SecretStr so that no repr or debugger view of the client shows it.
        self._api_key = SecretStr(key.strip())
        self.base_url = _check_base_url(base_url or DEFAULT_BASE_URL)
        if timeout <= 0:
            raise TavusConfigError("timeout must be positive")
        if max_retries < 0 or backoff_base < 0 or backoff_max < 0:
            raise TavusConfigError("max_retries, backoff_base and backoff_max must not be negative")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._sleep = sleep
        self._own_session = session is None
        self._session = session if session is not None else requests.Session()

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> TavusClient:
        """A client from echoq's settings: ``tavus_api_key`` and ``tavus_base_url``."""
        return cls(settings.tavus_api_key, settings.tavus_base_url, **kwargs)

    def __repr__(self) -> str:
        return f"TavusClient(base_url={self.base_url!r}, timeout={self.timeout!r}, max_retries={self.max_retries!r})"

    def close(self) -> None:
        """Close the connection pool, if this client created it."""
        if self._own_session:
            self._session.close()

    def __enter__(self) -> TavusClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- personas -------------------------------------------------------------------------------

    def create_persona(self, name: str, *, system_prompt: str | None = None, **extra: Any) -> dict[str, Any]:
        """Create an echo persona (``pipeline_mode`` is always ``"echo"``); returns Tavus's answer,
        which holds ``persona_id``. ``extra`` fields (``context``, ``default_replica_id``,
        ``layers``, ...) are passed through as they are."""
        if not name or not name.strip():
            raise ValueError("persona name must not be empty")
        check_text(name, "persona_name")  # InvalidInput naming the character, before any request
        body: dict[str, Any] = {**extra, "persona_name": name, "pipeline_mode": "echo"}
        if system_prompt is not None:
            body["system_prompt"] = system_prompt
        return _as_dict(self._request("POST", "/personas", json_body=body, creates=True))

    def list_personas(self, *, limit: int | None = None, page: int | None = None) -> dict[str, Any]:
        """List personas: Tavus's answer, ``{"data": [persona, ...], "total_count": n}``."""
        params = {k: v for k, v in (("limit", limit), ("page", page)) if v is not None}
        answer = self._request("GET", "/personas", params=params or None)
        if isinstance(answer, list):  # tolerate a bare list
            return {"data": answer, "total_count": len(answer)}
        return _as_dict(answer)

    def get_persona(self, persona_id: str) -> dict[str, Any]:
        """One persona by id; :class:`TavusNotFound` when there is none."""
        return _as_dict(self._request("GET", f"/personas/{_segment(persona_id)}"))

    # --- conversations --------------------------------------------------------------------------

    def create_conversation(
        self,
        persona_id: str,
        *,
        replica_id: str | None = None,
        conversation_name: str | None = None,
        callback_url: str | None = None,
        properties: Mapping[str, Any] | None = None,
        require_auth: bool | None = None,
        test_mode: bool | None = None,
        audio_only: bool | None = None,
        custom_greeting: str | None = None,
        conversational_context: str | None = None,
    ) -> dict[str, Any]:
        """Start a conversation; returns ``conversation_id``, ``conversation_url`` (the Daily room)
        and ``status``. ``properties`` holds ``max_call_duration``, ``participant_left_timeout``,
        ``participant_absent_timeout`` and the like, passed through as they are.

        ``require_auth`` makes the room private: the answer then carries a ``meeting_token``, a
        secret needed to join. ``test_mode`` (no replica joins, nothing billed), ``audio_only``,
        ``custom_greeting`` and ``conversational_context`` are sent as Tavus names them; None
        leaves a field out. Text that breaks echoq's text rule (:mod:`worker.text`) is
        :class:`~worker.errors.InvalidInput` naming the field, and nothing is sent."""
        if not persona_id or not persona_id.strip():
            raise ValueError("persona_id must not be empty")
        texts = {"conversation_name": conversation_name, "custom_greeting": custom_greeting,
                 "conversational_context": conversational_context}
        for field, value in texts.items():
            if value is not None:
                check_text(value, field)
        body: dict[str, Any] = {"persona_id": persona_id}
        if replica_id is not None:
            body["replica_id"] = replica_id
        if conversation_name is not None:
            body["conversation_name"] = conversation_name
        if callback_url is not None:
            body["callback_url"] = callback_url
        if properties:
            body["properties"] = dict(properties)
        optional = {"require_auth": require_auth, "test_mode": test_mode, "audio_only": audio_only,
                    "custom_greeting": custom_greeting, "conversational_context": conversational_context}
        body.update({k: v for k, v in optional.items() if v is not None})
        return _as_dict(self._request("POST", "/conversations", json_body=body, creates=True))

    def get_conversation(self, conversation_id: str) -> dict[str, Any]:
        """One conversation by id, with its ``status`` (``active`` or ``ended``)."""
        return _as_dict(self._request("GET", f"/conversations/{_segment(conversation_id)}"))

    def end_conversation(self, conversation_id: str) -> dict[str, Any]:
        """End a conversation (the room closes); returns Tavus's answer, often empty."""
        return _as_dict(self._request("POST", f"/conversations/{_segment(conversation_id)}/end"))

    def delete_conversation(self, conversation_id: str) -> None:
        """Delete a conversation (Tavus answers 204).

        A 404 on a retry means an earlier attempt did delete it (its answer was lost), so it
        counts as success; a 404 on the first attempt is raised as :class:`TavusNotFound`.
        """
        self._request("DELETE", f"/conversations/{_segment(conversation_id)}", gone_ok_on_retry=True)

    # --- transport ------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        creates: bool = False,
        gone_ok_on_retry: bool = False,
    ) -> Any:
        """Send one logical call with retries; the parsed JSON answer (None when empty)."""
        url = self.base_url + path
        headers = {API_KEY_HEADER: self._api_key.get_secret_value(), "Accept": "application/json"}
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            t0 = time.monotonic()
            try:
                response = self._session.request(
                    method,
                    url,
                    headers=headers,
                    json=json_body,
                    params=params,
                    timeout=self.timeout,
                    # A redirect would carry x-api-key to wherever it points: never follow one.
                    allow_redirects=False,
                )
            except requests.RequestException as exc:
                duration = (time.monotonic() - t0) * 1000.0
                kind = type(exc).__name__
                retry = not last and (not creates or _not_sent(exc))
                step(
                    logger,
                    "tavus.call",
                    logging.WARNING,
                    method=method,
                    path=path,
                    status=None,
                    error=kind,
                    attempt=attempt,
                    duration_ms=duration,
                    retrying=retry or None,
                )
                if retry:
                    self._sleep(self._backoff(attempt, None))
                    continue
                detail = "timed out" if isinstance(exc, requests.Timeout) else "could not connect"
                if not isinstance(exc, (requests.Timeout, requests.ConnectionError)):
                    detail = "request failed"
                raise TavusUnavailable(
                    self._scrub(f"{detail} after {attempt} attempt(s) ({kind})"), method=method, path=path
                ) from exc

            duration = (time.monotonic() - t0) * 1000.0
            status = response.status_code
            busy = status == 400 and self._over_concurrency(response)
            transient = status == 429 or status >= 500 or busy
            retry = transient and not last and (not creates or status == 429 or busy)
            level = logging.INFO if status < 400 else logging.WARNING
            step(
                logger,
                "tavus.call",
                level,
                method=method,
                path=path,
                status=status,
                attempt=attempt,
                duration_ms=duration,
                retrying=retry or None,
            )
            if 200 <= status < 300:
                return self._parse(response, method, path)
            if status == 404 and gone_ok_on_retry and attempt > 1:
                response.close()
                return None
            if retry:
                wait = self._backoff(attempt, response.headers.get("Retry-After"))
                response.close()
                self._sleep(wait)
                continue
            error = TavusConcurrencyLimit if busy else _error_for_status(status)
            raise error(self._message_of(response), status=status, method=method, path=path)
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait after failed ``attempt``: Retry-After when given, else doubling with
        jitter; both capped by ``backoff_max``."""
        hinted = _parse_retry_after(retry_after)
        if hinted is not None:
            return min(hinted, self.backoff_max)
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        # "Equal jitter": at least half the ceiling, so retries never bunch up at zero.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _over_concurrency(self, response: requests.Response) -> bool:
        """Whether a 400 is Tavus's "maximum concurrent conversations" (wait, then retry)."""
        return bool(_CONCURRENCY.search(self._message_of(response)))

    def _parse(self, response: requests.Response, method: str, path: str) -> Any:
        if response.status_code == 204 or not response.content.strip():
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise TavusHTTPError(
                "answer is not JSON", status=response.status_code, method=method, path=path
            ) from exc

    def _message_of(self, response: requests.Response) -> str:
        """Tavus's own message from an error answer: JSON ``message`` or ``error``, else text."""
        text = ""
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            for field in ("message", "error", "detail"):
                value = body.get(field)
                if isinstance(value, str) and value.strip():
                    text = value
                    break
                if value:
                    text = json.dumps(value, default=str)
                    break
        if not text:
            text = response.text or response.reason or ""
        # Scrub before cutting, so that a cut can never leave part of the key behind.
        text = " ".join(self._scrub(text).split())
        if len(text) > _MAX_MESSAGE_CHARS:
            text = text[: _MAX_MESSAGE_CHARS - 1] + "…"
        return text

    def _scrub(self, text: str) -> str:
        """The text with every occurrence of the API key replaced."""
        key = self._api_key.get_secret_value()
        return text.replace(key, _REDACTED) if key else text


# --- helpers ------------------------------------------------------------------------------------


def _check_base_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TavusConfigError(f"Tavus base URL must be an http(s) URL, got {url!r}")
    if parts.username or parts.password:
        raise TavusConfigError("Tavus base URL must not hold credentials; set TAVUS_API_KEY")
    return url.strip().rstrip("/")


def _segment(value: str) -> str:
    """An id as one URL path segment; an empty id is a caller error, not a request."""
    if not value or not value.strip():
        raise ValueError("id must not be empty")
    return quote(value.strip(), safe="")


def _as_dict(answer: Any) -> dict[str, Any]:
    if answer is None:
        return {}
    if isinstance(answer, dict):
        return answer
    return {"data": answer}


def _not_sent(exc: requests.RequestException) -> bool:
    """Whether the request surely never reached Tavus: the connection itself failed to open."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if not isinstance(exc, requests.ConnectionError) or isinstance(exc, requests.Timeout):
        return False
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (u3.NewConnectionError, u3.ConnectTimeoutError, ConnectionRefusedError)):
            return True
        nested = getattr(cause, "reason", None)
        if not isinstance(nested, BaseException):
            nested = cause.args[0] if cause.args and isinstance(cause.args[0], BaseException) else None
        cause = nested or cause.__cause__ or cause.__context__
    return False


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None when absent or bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)
