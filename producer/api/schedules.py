"""The HTTP API's ``/v1/schedules`` routes: what ``echoq schedule`` does, over HTTP.

    POST   /v1/schedules                    add (201): an inline script plus one of cron/every/at
    GET    /v1/schedules                    list
    GET    /v1/schedules/{id}               show, with its last run
    PATCH  /v1/schedules/{id}               edit script, timing, tz, name or grace
    POST   /v1/schedules/{id}/pause         stop firing
    POST   /v1/schedules/{id}/resume        fire again from the next slot
    DELETE /v1/schedules/{id}               remove, with its history (204)
    GET    /v1/schedules/{id}/runs?limit=   run history, newest first

The body takes the fields the CLI takes: ``script`` is an object shaped like a script file,
``conversation`` aims it at an open conversation (``--conversation``). :func:`register` adds the
routes to the app built by :func:`producer.api.create_app`, behind the same bearer gate and with
the same error mapping: the store's :class:`~worker.errors.InvalidInput` is a 422 whose ``loc``
names the field (one entry per script problem, naming the line and the field), "no schedule"
a 404, Redis unreachable a 503.

The store works on the API client's Redis connection; RedBeat entries go where
``ECHOQ_REDIS_URL`` and ``ECHOQ_REDBEAT_KEY_PREFIX`` point, as for ``echoq beat``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path, Query, Response
from fastapi.params import Depends
from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.errors import InvalidInput
from worker.logs import step

from ..client import EchoqClient
from ..scripting.runs import Runner
from ..scripting.schedules import HISTORY_MAX, SCHEDULE_ID_RE, Schedules
from ..scripting.script import ScriptError
from .errors import ERRORS, ApiError, Loc, invalid, mapped
from .models import _CONV_ID

__all__ = ["register", "ScheduleIn", "ScheduleEdit", "ScheduleOut", "RunOut"]

logger = logging.getLogger("echoq.api")

#: fields a store message may start with ("cron: ... is not a five-field cron expression")
_FIELD_PREFIX_RE = re.compile(r"^(cron|every|at|tz|grace|script): ")
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no such schedule"}}

ScheduleId = Annotated[str, Path(pattern=SCHEDULE_ID_RE.pattern, description="schedule id",
                                 openapi_examples={"morning": {"value": "morning"}})]

_SCRIPT_DOC = ("the script, shaped like a script file: `conversation` (an open conversation id, or "
               "`{persona_id, replica_id?, name?, properties?}` to create one on Tavus at each run), "
               "`lines` (each `text` or `audio` (http(s) URL or a path the workers can read), with optional "
               "`pause`, `at`, `sample_rate`) and an optional `name`")
_EXAMPLE_SCRIPT: dict[str, Any] = {"conversation": "demo", "lines": [{"text": "Good morning!", "pause": "2s"}, {"text": "Welcome."}]}


# --- models -------------------------------------------------------------------------------------


class _Timed(BaseModel):
    """Fields shared by adding and editing: script, timing, timezone, name, grace, conversation."""

    cron: str | None = Field(default=None, max_length=200, description="five-field cron, e.g. `0 9 * * 1-5`, in `tz`")
    every: float | str | None = Field(default=None, description="interval: seconds, or `30s`, `5m`, `1h`")
    at: str | None = Field(default=None, max_length=64,
                           description="one ISO 8601 date-time; a naive one is read in `tz`")
    tz: str | None = Field(default=None, max_length=64, description="IANA timezone (default UTC)")
    name: str | None = Field(default=None, max_length=200, description="a label shown in listings")
    grace: float | str | None = Field(default=None,
                                      description="run a missed firing up to this late (default ECHOQ_SCHEDULE_GRACE_S)")
    conversation: str | None = Field(default=None, pattern=_CONV_ID,
                                     description="speak into this open conversation instead of the script's target")

    @field_validator("every", "grace", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be seconds or a duration such as '30s', not a boolean")
        return value


class ScheduleIn(_Timed):
    """A new schedule: the body of ``echoq schedule add``, with the script inline."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"script": _EXAMPLE_SCRIPT, "every": "30s", "id": "welcome"},
        {"script": _EXAMPLE_SCRIPT, "cron": "0 9 * * 1-5", "tz": "Europe/Paris", "grace": "5m", "name": "weekday"},
    ]})

    script: dict[str, Any] = Field(description=_SCRIPT_DOC)
    id: str | None = Field(default=None, pattern=SCHEDULE_ID_RE.pattern, description="schedule id (default: new)")


class ScheduleEdit(_Timed):
    """Changes to a schedule (``echoq schedule edit``); they apply from the next slot."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"every": "1m"}, {"script": _EXAMPLE_SCRIPT}, {"conversation": "demo"},
    ]})

    script: dict[str, Any] | None = Field(default=None, description=f"a new script: {_SCRIPT_DOC}")


class TimingOut(BaseModel):
    """When a schedule fires."""

    kind: Literal["cron", "every", "at"]
    tz: str
    cron: str | None = None
    every: int | None = Field(default=None, description="seconds")
    at: str | None = None


class RunLineOut(BaseModel):
    """One line of a run: its utterance and how far it got."""

    model_config = ConfigDict(extra="allow")

    n: int
    utterance_id: str
    kind: str | None = None
    state: str | None = Field(default=None, description="pending, queued, sending, sent, spoken, failed, ...")
    queued_at: float | None = None
    sent_at: float | None = None
    spoken_at: float | None = None
    error: str | None = None


class RunOut(BaseModel):
    """One firing: its slot, when it fired and how late, and each line's utterance."""

    model_config = ConfigDict(extra="allow")

    id: str
    schedule_id: str | None = None
    state: str = Field(description="running, done, failed or skipped")
    slot: float | None = None
    fired_at: float | None = None
    late_s: float = 0.0
    conversation_id: str | None = None
    finished_at: float | None = None
    error: str | None = None
    lines: list[RunLineOut] = []


class ScheduleOut(BaseModel):
    """A schedule: its timing, script, state and next firing (and, when shown alone, its last run)."""

    model_config = ConfigDict(extra="allow")

    id: str
    name: str | None = None
    state: Literal["active", "paused", "finished"]
    describe: str
    next_run: str | None = Field(default=None, description="ISO 8601 in the schedule's timezone")
    timing: TimingOut
    script: dict[str, Any]
    grace_s: float | None = None
    paused: bool = False
    created_at: float
    updated_at: float
    last_run: RunOut | None = None


# --- errors -------------------------------------------------------------------------------------


def _script_problems(exc: ScriptError, base: Loc) -> ApiError:
    """One 422 entry per script problem: ``loc`` is the path in the body (lines 0-based, as
    JSON indexes them), ``msg`` names the script line (1-based) and the field."""
    errors = []
    for p in exc.problems:
        loc: list[str | int] = list(base)
        if p.line is not None:
            loc += ["lines", p.line - 1]
        if p.field not in ("script", "line"):
            loc += p.field.split(".")
        errors.append({"loc": loc, "msg": str(p), "type": "value_error"})
    return ApiError(422, errors)


def _storeinvalid(msg: str) -> ApiError:
    """Which body field a store message is about: its prefix, or the id it names."""
    if match := _FIELD_PREFIX_RE.match(msg):
        return invalid(("body", match.group(1)), msg)
    if msg.startswith(("schedule id", "a schedule ")):
        return invalid(("body", "id"), msg)
    return invalid(("body",), msg)


@contextmanager
def _schedule_errors(script_loc: Loc = ("body", "script")) -> Iterator[None]:
    """Map the store's errors: "no schedule" 404, other bad input 422 on its field, Redis 503."""
    with mapped():
        try:
            yield
        except ScriptError as exc:
            raise _script_problems(exc, script_loc) from exc
        except InvalidInput as exc:
            msg = str(exc)
            if msg.startswith("no schedule"):
                raise ApiError(404, msg) from exc
            raise _storeinvalid(msg) from exc


def _retarget(script: dict[str, Any], conversation: str | None) -> dict[str, Any]:
    """The script aimed at ``conversation`` when one is given, as ``--conversation`` does."""
    return script if conversation is None else {**script, "conversation": conversation}


# --- routes -------------------------------------------------------------------------------------


def register(app: FastAPI, protected: Sequence[Depends], echoq: EchoqClient) -> Schedules:
    """Add the ``/v1/schedules`` routes to ``app``, each behind ``protected``; the store uses
    ``echoq``'s Redis connection and settings. Returns the store."""
    store = Schedules(echoq.redis, settings=echoq.settings,
                      runner=Runner(echoq.redis, settings=echoq.settings, client=echoq))
    deps = list(protected)
    tags: list[str | Enum] = ["schedules"]

    @app.post("/v1/schedules", status_code=201, response_model=ScheduleOut, dependencies=deps, tags=tags,
              responses=ERRORS)
    def add_schedule(body: ScheduleIn) -> Any:
        """Add a schedule for an inline script: exactly one of `cron`, `every` or `at`. It fires
        from its next slot, through `echoq beat`."""
        with _schedule_errors():
            rec = store.add(_retarget(body.script, body.conversation), cron=body.cron, every=body.every, at=body.at,
                            tz=body.tz, schedule_id=body.id, name=body.name, grace=body.grace)
        step(logger, "api.schedule.added", schedule_id=rec["id"], timing=rec["describe"])
        return rec

    @app.get("/v1/schedules", response_model=list[ScheduleOut], dependencies=deps, tags=tags, responses=ERRORS)
    def list_schedules() -> Any:
        """Every schedule, by id, with its state and next firing."""
        with _schedule_errors():
            return store.list()

    @app.get("/v1/schedules/{schedule_id}", response_model=ScheduleOut, dependencies=deps, tags=tags,
             responses={**ERRORS, **_NOT_FOUND})
    def show_schedule(schedule_id: ScheduleId) -> Any:
        """One schedule with its next firing and its last run."""
        with _schedule_errors():
            return store.get(schedule_id)

    @app.patch("/v1/schedules/{schedule_id}", response_model=ScheduleOut, dependencies=deps, tags=tags,
               responses={**ERRORS, **_NOT_FOUND})
    def edit_schedule(schedule_id: ScheduleId, body: ScheduleEdit) -> Any:
        """Change the script, timing, timezone, name or grace; slots from now on follow the change.
        `conversation` alone re-aims the current script."""
        with _schedule_errors():
            current = store.get(schedule_id)
            script = body.script
            if body.conversation is not None:
                script = _retarget(script if script is not None else current["script"], body.conversation)
            rec = store.update(schedule_id, script=script, cron=body.cron, every=body.every, at=body.at,
                               tz=body.tz, name=body.name, grace=body.grace)
        step(logger, "api.schedule.edited", schedule_id=schedule_id, timing=rec["describe"])
        return rec

    @app.post("/v1/schedules/{schedule_id}/pause", response_model=ScheduleOut, dependencies=deps, tags=tags,
              responses={**ERRORS, **_NOT_FOUND})
    def pause_schedule(schedule_id: ScheduleId) -> Any:
        """Stop firing until resumed (the RedBeat entry is removed)."""
        with _schedule_errors():
            rec = store.pause(schedule_id)
        step(logger, "api.schedule.paused", schedule_id=schedule_id)
        return rec

    @app.post("/v1/schedules/{schedule_id}/resume", response_model=ScheduleOut, dependencies=deps, tags=tags,
              responses={**ERRORS, **_NOT_FOUND})
    def resume_schedule(schedule_id: ScheduleId) -> Any:
        """Fire again from the next slot; slots that passed while paused never run."""
        with _schedule_errors():
            rec = store.resume(schedule_id)
        step(logger, "api.schedule.resumed", schedule_id=schedule_id)
        return rec

    @app.delete("/v1/schedules/{schedule_id}", status_code=204, response_class=Response, dependencies=deps,
                tags=tags, responses={**ERRORS, **_NOT_FOUND})
    def remove_schedule(schedule_id: ScheduleId) -> Response:
        """Delete the schedule, its RedBeat entry and its run history (utterance records stay)."""
        with _schedule_errors():
            store.remove(schedule_id)
        step(logger, "api.schedule.removed", schedule_id=schedule_id)
        return Response(status_code=204)

    @app.get("/v1/schedules/{schedule_id}/runs", response_model=list[RunOut], dependencies=deps, tags=tags,
             responses={**ERRORS, **_NOT_FOUND})
    def schedule_runs(
        schedule_id: ScheduleId,
        limit: Annotated[int, Query(ge=1, le=HISTORY_MAX, description="at most this many runs")] = 20,
    ) -> Any:
        """The schedule's runs, newest first: slot, when it fired, how late, and each line's
        utterance and state (`skipped` for a firing missed past its grace window)."""
        with _schedule_errors():
            store.get(schedule_id)
            return store.history(schedule_id, limit=limit)

    return store
