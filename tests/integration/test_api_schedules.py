"""The HTTP API's /v1/schedules for real: uvicorn on a free port (test_api's ``serve``), and for
firings a real worker, a real ``echoq beat`` and the simulator (test_schedules' helpers).

Every route and status (201, 200, 204, 401, 404, 422, 503) is exercised over HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis

from producer.client import EchoqClient
from producer.scripting.beat import REDBEAT_PREFIX_ENV
from tests.integration import test_api, test_schedules
from tests.integration.conftest import Workers, wait_for
from tests.integration.test_api import TOKEN, Api, field_of, open_loopback
from tests.integration.test_schedules import Beats, assert_each_run_spoken_once_in_order, echo_ids, script

pytestmark = pytest.mark.redis

# Fixtures of the sibling modules, made available here by name.
serve = test_api.serve
beats = test_schedules.beats

#: every schedule route, with a request that would reach its handler with a token
ROUTES: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/v1/schedules", {"json": {"script": script("gate", "hi"), "every": "1h", "id": "gate"}}),
    ("GET", "/v1/schedules", {}),
    ("GET", "/v1/schedules/gate", {}),
    ("PATCH", "/v1/schedules/gate", {"json": {"every": "2h"}}),
    ("POST", "/v1/schedules/gate/pause", {}),
    ("POST", "/v1/schedules/gate/resume", {}),
    ("DELETE", "/v1/schedules/gate", {}),
    ("GET", "/v1/schedules/gate/runs", {"params": {"limit": 5}}),
]


def add(api: Api, **body: Any) -> httpx.Response:
    return api.http.post("/v1/schedules", json=body)


def ids(api: Api) -> list[str]:
    r = api.http.get("/v1/schedules")
    assert r.status_code == 200, r.text
    return [s["id"] for s in r.json()]


# --- the routes and their answers ---------------------------------------------------------------


def test_add_list_show_edit_pause_resume_runs_and_remove(serve: Callable[..., Api], prefix: str,
                                                          redis_client: redis.Redis) -> None:
    api = serve()
    r = add(api, script=script("lobby", "Good morning!", "Welcome.", pause="2s"), every="1h", id="morning",
            name="Morning", grace="5m", conversation="hall")
    assert r.status_code == 201, r.text
    rec = r.json()
    assert rec["id"] == "morning" and rec["name"] == "Morning" and rec["state"] == "active"
    assert rec["timing"] == {"kind": "every", "tz": "UTC", "every": 3600, "cron": None, "at": None}
    assert rec["grace_s"] == 300 and rec["paused"] is False and rec["next_run"]
    assert rec["script"]["conversation"] == {"id": "hall"}  # `conversation` re-aims the script, as --conversation
    assert [ln["text"] for ln in rec["script"]["lines"]] == ["Good morning!", "Welcome."]
    assert rec["last_run"] is None
    assert redis_client.exists(f"{prefix}echoq-schedule:morning")  # armed for `echoq beat`

    r = add(api, script={"conversation": "lobby", "lines": ["Hello."]}, cron="0 9 * * 1-5", tz="Europe/Paris")
    assert r.status_code == 201, r.text
    other = r.json()["id"]
    assert r.json()["describe"] == "cron '0 9 * * 1-5' (Europe/Paris)"
    assert r.json()["next_run"].endswith(("+01:00", "+02:00"))
    assert sorted(ids(api)) == sorted(["morning", other])

    r = api.http.get("/v1/schedules/morning")
    assert r.status_code == 200 and r.json()["id"] == "morning" and r.json()["last_run"] is None

    r = api.http.patch("/v1/schedules/morning", json={"cron": "30 8 * * *", "tz": "America/New_York", "name": "Early"})
    assert r.status_code == 200, r.text
    assert r.json()["timing"]["kind"] == "cron" and r.json()["timing"]["tz"] == "America/New_York"
    assert r.json()["name"] == "Early" and r.json()["script"]["conversation"] == {"id": "hall"}
    r = api.http.patch("/v1/schedules/morning", json={"conversation": "lobby"})  # alone: re-aims the current script
    assert r.status_code == 200 and r.json()["script"]["conversation"] == {"id": "lobby"}
    assert [ln["text"] for ln in r.json()["script"]["lines"]] == ["Good morning!", "Welcome."]
    r = api.http.patch("/v1/schedules/morning", json={"script": script("lobby", "Changed."), "tz": "Asia/Tokyo"})
    assert r.status_code == 200 and r.json()["timing"]["cron"] == "30 8 * * *" and r.json()["timing"]["tz"] == "Asia/Tokyo"
    assert [ln["text"] for ln in r.json()["script"]["lines"]] == ["Changed."]

    r = api.http.post("/v1/schedules/morning/pause")
    assert r.status_code == 200 and r.json()["state"] == "paused" and r.json()["next_run"] is None
    assert not redis_client.exists(f"{prefix}echoq-schedule:morning")
    r = api.http.post("/v1/schedules/morning/resume")
    assert r.status_code == 200 and r.json()["state"] == "active" and r.json()["next_run"]
    assert redis_client.exists(f"{prefix}echoq-schedule:morning")

    r = api.http.get("/v1/schedules/morning/runs", params={"limit": 5})
    assert r.status_code == 200 and r.json() == []

    r = api.http.delete("/v1/schedules/morning")
    assert r.status_code == 204 and r.content == b""
    assert not redis_client.exists(f"{prefix}echoq-schedule:morning")
    assert ids(api) == [other]

    # 404 on every route for a schedule that is gone or never was
    for method, path, kwargs in ROUTES[2:]:
        for sid in ("morning", "never-was"):
            r = api.http.request(method, path.replace("gate", sid), **kwargs)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["detail"] == f"no schedule {sid!r}"


def test_bad_input_is_422_naming_the_field_and_stores_nothing(serve: Callable[..., Api], prefix: str,
                                                             redis_client: redis.Redis) -> None:
    api = serve()
    good = script("lobby", "Hello.")

    # script problems: one entry per problem, naming the line (1-based in msg, 0-based in loc) and the field
    r = add(api, script={"conversation": "lobby", "lines": [{"text": "fine"}, {"text": "x", "pause": "soon"}]},
            every="1h")
    assert field_of(r) == ["body", "script", "lines", 1, "pause"]
    assert r.json()["detail"][0]["msg"].startswith("line 2: pause:")
    r = add(api, script={"conversation": {"id": "bad id"}, "lines": [{"text": "a", "audio": "b.wav"}, 7],
                         "extra": 1}, every="1h")
    assert [e["loc"] for e in r.json()["detail"]] == [
        ["body", "script", "extra"], ["body", "script", "conversation", "id"],
        ["body", "script", "lines", 0, "text/audio"], ["body", "script", "lines", 1]]
    assert field_of(add(api, script={"lines": ["a"]}, every="1h")) == ["body", "script", "conversation"]
    assert field_of(add(api, script={"conversation": "lobby", "lines": []}, every="1h")) == ["body", "script", "lines"]
    assert field_of(add(api, every="1h")) == ["body", "script"]
    assert field_of(add(api, script=["not", "a", "mapping"], every="1h")) == ["body", "script"]

    # timing, timezone, grace, id and the body itself
    cases: list[tuple[dict[str, Any], list[str | int]]] = [
        ({}, ["body"]),
        ({"every": "1h", "cron": "* * * * *"}, ["body"]),
        ({"cron": "0 9 * *"}, ["body", "cron"]),
        ({"cron": "0 0 30 2 *"}, ["body", "cron"]),  # parses, but February has no 30th
        ({"every": "0.5s"}, ["body", "every"]),
        ({"every": "soon"}, ["body", "every"]),
        ({"every": 1e300}, ["body", "every"]),
        ({"every": True}, ["body", "every"]),
        ({"at": "2001-01-01T00:00"}, ["body", "at"]),
        ({"at": "tomorrow"}, ["body", "at"]),
        ({"at": "9999-12-31T23:00", "tz": "America/New_York"}, ["body", "at"]),  # past the end of the calendar
        ({"every": "1h", "tz": "Mars/Olympus"}, ["body", "tz"]),
        ({"every": "1h", "grace": "a while"}, ["body", "grace"]),
        ({"every": "1h", "id": "bad id"}, ["body", "id"]),
        ({"every": "1h", "conversation": "bad id"}, ["body", "conversation"]),
        ({"every": "1h", "nope": 1}, ["body", "nope"]),
    ]
    for extra, loc in cases:
        r = add(api, script=good, **extra)
        assert field_of(r)[:len(loc)] == loc, (extra, r.text)
    assert ids(api) == []
    assert not redis_client.keys(f"{prefix}*echoq-schedule:*")

    # an id that is taken
    assert add(api, script=good, every="1h", id="taken").status_code == 201
    r = add(api, script=good, every="2h", id="taken")
    assert field_of(r) == ["body", "id"] and "already exists" in r.json()["detail"][0]["msg"]
    assert api.http.get("/v1/schedules/taken").json()["timing"]["every"] == 3600

    # edits are checked the same way, and a refused edit changes nothing
    before = api.http.get("/v1/schedules/taken").json()
    for body, loc in [({"every": "soon"}, ["body", "every"]), ({"cron": "0 0 31 4 *"}, ["body", "cron"]),
                      ({"every": "1h", "at": "2030-01-01T00:00"}, ["body"]), ({"tz": "Nowhere/City"}, ["body", "tz"]),
                      ({"script": {"conversation": "lobby", "lines": ["ok", {"text": ""}]}},
                       ["body", "script", "lines", 1, "text"]),
                      ({"conversation": "bad id"}, ["body", "conversation"]), ({"id": "x"}, ["body", "id"])]:
        assert field_of(api.http.patch("/v1/schedules/taken", json=body)) == loc, body
    assert api.http.get("/v1/schedules/taken").json() == before

    # the path and the query
    assert field_of(api.http.get("/v1/schedules/-bad-")) == ["path", "schedule_id"]
    assert field_of(api.http.delete("/v1/schedules/" + "x" * 65)) == ["path", "schedule_id"]
    assert field_of(api.http.get("/v1/schedules/taken/runs", params={"limit": 0})) == ["query", "limit"]
    assert field_of(api.http.get("/v1/schedules/taken/runs", params={"limit": 10_000})) == ["query", "limit"]


def test_a_missing_or_wrong_token_never_reaches_a_schedule_handler(serve: Callable[..., Api], prefix: str,
                                                                   redis_client: redis.Redis) -> None:
    api = serve()
    assert add(api, script=script("lobby", "hi"), every="1h", id="gate").status_code == 201
    calls = dict(api.app.state.handler_calls)
    before = {k: redis_client.dump(k) for k in redis_client.keys("*")}
    with httpx.Client(base_url=api.url, timeout=10) as bare:
        for method, path, kwargs in ROUTES:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
                r = bare.request(method, path, headers=headers, **kwargs)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
    assert dict(api.app.state.handler_calls) == calls
    assert {k: redis_client.dump(k) for k in redis_client.keys("*")} == before
    # the documentation lists every route, open to read
    with httpx.Client(base_url=api.url, timeout=10) as bare:
        paths = bare.get("/openapi.json").json()["paths"]
    assert set(paths["/v1/schedules"]) == {"get", "post"}
    assert set(paths["/v1/schedules/{schedule_id}"]) == {"get", "patch", "delete"}
    assert {"/v1/schedules/{schedule_id}/pause", "/v1/schedules/{schedule_id}/resume",
            "/v1/schedules/{schedule_id}/runs"} <= set(paths)


def test_redis_unreachable_is_503_on_every_schedule_route(serve: Callable[..., Api]) -> None:
    api = serve(client=EchoqClient("redis://127.0.0.1:1/0"))
    for method, path, kwargs in ROUTES:
        r = api.http.request(method, path, **kwargs)
        assert r.status_code == 503, (method, path, r.text)
        assert r.json()["detail"].startswith("Redis is unreachable"), r.text


# --- firings ------------------------------------------------------------------------------------


def runs(api: Api, sid: str) -> list[dict[str, Any]]:
    r = api.http.get(f"/v1/schedules/{sid}/runs", params={"limit": 200})
    assert r.status_code == 200, r.text
    return list(r.json())


def test_a_schedule_added_over_http_fires_is_spoken_then_pause_stops_it_and_delete_removes_it(
    workers: Workers, simulator: Any, serve: Callable[..., Api], beats: Beats, prefix: str, redis_client: redis.Redis,
) -> None:
    workers.start(1, **{REDBEAT_PREFIX_ENV: prefix})
    api = serve()
    open_loopback(api, "conv-h", "room-h")
    open_loopback(api, "conv-clock", "room-clock")
    r = add(api, script=script("conv-h", "first over http", "second over http"), every="2s", id="http-tick")
    assert r.status_code == 201, r.text
    # a second schedule keeps firing while the first is paused: proof that beat went on ticking
    assert add(api, script=script("conv-clock", "tick"), every="2s", id="clock").status_code == 201
    beats.start()

    def spoken_run() -> dict[str, Any] | None:
        return next((run for run in runs(api, "http-tick")
                     if run["state"] == "done" and all(ln["state"] == "spoken" for ln in run["lines"])), None)

    run = wait_for(spoken_run, 60, what="a firing whose lines the replica spoke")
    assert [ln["utterance_id"] for ln in run["lines"]] == [f"{run['id']}:1", f"{run['id']}:2"]
    assert run["schedule_id"] == "http-tick" and run["conversation_id"] == "conv-h"
    heard = simulator.report()["rooms"]["room-h"]
    assert {f"{run['id']}:1", f"{run['id']}:2"} <= {u["inference_id"] for u in heard["utterances"] if u["done"]}
    assert heard["violations"] == []
    shown = api.http.get("/v1/schedules/http-tick").json()
    assert shown["last_run"] is not None and shown["last_run"]["id"].startswith("sch:http-tick:")

    r = api.http.post("/v1/schedules/http-tick/pause")
    assert r.status_code == 200 and r.json()["state"] == "paused"
    paused_at = r.json()["updated_at"]
    clock_slots = {c["slot"] for c in runs(api, "clock")}
    wait_for(lambda: len([c for c in runs(api, "clock") if c["slot"] not in clock_slots and c["slot"] > paused_at]) >= 2,
             60, what="two more firings of the clock schedule after the pause")
    late = [t for t in runs(api, "http-tick") if t["slot"] > paused_at + 1.0]
    assert late == [], "the paused schedule fired"
    history = [t for t in runs(api, "http-tick") if t["state"] == "done"]
    assert_each_run_spoken_once_in_order(history, echo_ids(redis_client, "room-h"))

    r = api.http.delete("/v1/schedules/http-tick")
    assert r.status_code == 204
    assert api.http.get("/v1/schedules/http-tick").status_code == 404
    assert api.http.get("/v1/schedules/http-tick/runs").status_code == 404
    assert not redis_client.exists(f"{prefix}echoq-schedule:http-tick")
    assert ids(api) == ["clock"]
