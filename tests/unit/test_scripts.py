"""Script validation and schedule slot arithmetic: pure, no services."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from producer.scripting.script import ScriptError, load_script, parse_duration, parse_script, parse_text
from producer.scripting.timing import latest_slot, next_slot, parse_slot_id, parse_timing, slot_id
from worker.errors import InvalidInput

GOOD = """\
name: demo
conversation: conv-1
lines:
  - text: Hello
    pause: 1.5s
  - audio: clip.wav
    sample_rate: 16000
  - text: Later
    at: 1m
"""


def test_a_good_script_parses_and_round_trips(tmp_path: Path) -> None:
    (tmp_path / "clip.wav").write_bytes(b"RIFF")
    (tmp_path / "s.yaml").write_text(GOOD)
    script = load_script(tmp_path / "s.yaml")
    assert script.target.conversation_id == "conv-1"
    assert [ln.kind for ln in script.lines] == ["text", "audio", "text"]
    assert script.lines[0].pause_s == 1.5 and script.lines[2].at_s == 60.0
    assert script.lines[1].audio == str(tmp_path / "clip.wav")
    assert parse_script(script.to_dict(), check_audio=False) == script


def test_errors_name_every_bad_line_and_field_with_the_file_line() -> None:
    text = "conversation: c\nlines:\n  - text: ok\n  - text: ''\n  - {text: hi, sample_rate: 16000}\n" \
           "  - audio: a.wav\n    sample_rate: 22050\n  - {text: x, pause: soon, colour: red}\n"
    with pytest.raises(ScriptError) as err:
        parse_text(text, check_audio=False)
    got = {(p.line, p.field, p.source_line) for p in err.value.problems}
    # each file line is the bad field's own: line 4's sample_rate is on the file line after its start
    assert got == {(2, "text", 4), (3, "sample_rate", 5), (4, "sample_rate", 7), (5, "pause", 8), (5, "colour", 8)}
    assert "line 2 (file line 4): text:" in str(err.value)


def test_unknown_top_level_and_conversation_keys_get_their_file_line() -> None:
    text = "name: n\nconversation:\n  id: c\n  colour: red\nlines:\n  - hi\nextra: 1\n"
    with pytest.raises(ScriptError) as err:
        parse_text(text, check_audio=False)
    got = {(p.line, p.field, p.source_line) for p in err.value.problems}
    assert got == {(None, "extra", 7), (None, "conversation.colour", 4)}
    assert "file line 7: extra: unknown field" in str(err.value)


@pytest.mark.parametrize("text, fmt, line, column, words", [
    # a mis-indented field: the problem itself, not only YAML's "while parsing" context
    ("conversation: c\nlines:\n  - text: hi\n   pause: 2s\n", "yaml", 4, 4, "expected <block end>"),
    ("conversation: c\nlines: [\n", "yaml", 3, 1, "found '<stream end>'"),
    ('{"conversation": "c", "lines": [}', "json", 1, 33, "Expecting value"),
])
def test_syntax_errors_name_the_problem_with_file_line_and_column(text: str, fmt: str, line: int, column: int,
                                                                  words: str) -> None:
    with pytest.raises(ScriptError) as err:
        parse_text(text, fmt=fmt, check_audio=False)
    (problem,) = err.value.problems
    assert (problem.source_line, problem.source_column) == (line, column)
    assert words in problem.message
    assert f"file line {line}, column {column}: not valid {fmt.upper()}: " in str(err.value)


@pytest.mark.parametrize("data, field", [
    ({"lines": [{"text": "x"}]}, "conversation"),
    ({"conversation": {"id": "c", "persona_id": "p"}, "lines": [{"text": "x"}]}, "conversation"),
    ({"conversation": "c", "lines": []}, "lines"),
    ({"conversation": "bad id!", "lines": [{"text": "x"}]}, "conversation.id"),
    ({"conversation": "c", "lines": [{"text": "x", "audio": "y"}]}, "text/audio"),
    ({"conversation": "c", "lines": [{"text": "x", "at": 5}, {"text": "y", "at": 2}]}, "at"),
    ({"conversation": "c", "lines": [{"text": "x", "pause": 2}, {"text": "y", "at": 5}]}, "pause"),
    ({"conversation": "c", "lines": [{"text": "x" * 5000}]}, "text"),
])
def test_bad_scripts_are_refused(data: dict, field: str) -> None:
    with pytest.raises(ScriptError) as err:
        parse_script(data, check_audio=False)
    assert field in {p.field for p in err.value.problems}


def test_missing_audio_files_are_caught_unless_not_checked(tmp_path: Path) -> None:
    data = {"conversation": "c", "lines": [{"audio": "nope.wav"}]}
    with pytest.raises(ScriptError, match="line 1: audio: no such file"):
        parse_script(data, base_dir=tmp_path)
    assert parse_script(data, base_dir=tmp_path, check_audio=False).lines[0].audio == str(tmp_path / "nope.wav")


def test_a_persona_target_and_json_scripts() -> None:
    s = parse_text('{"conversation": {"persona_id": "p1", "replica_id": "r1"}, "lines": ["hi"]}', fmt="json")
    assert s.target.creates_conversation and s.target.persona_id == "p1" and s.lines[0].text == "hi"
    assert s.with_conversation("c9").target.conversation_id == "c9"


def test_durations() -> None:
    assert [parse_duration(v) for v in (3, 2.5, "500ms", "3s", "2m", "1h")] == [3, 2.5, 0.5, 3, 120, 3600]
    for bad in (-1, "soon", True, "2d", "25h"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_cron_slots_follow_the_timezone_across_dst() -> None:
    t = parse_timing(cron="0 9 * * 1-5", tz="Europe/Paris")
    fri = latest_slot(t, 0, datetime(2026, 3, 28, 12, tzinfo=UTC))  # a Saturday: Friday's slot, winter time
    assert fri == datetime(2026, 3, 27, 8, tzinfo=UTC)
    mon = next_slot(t, 0, fri)  # DST began on Sunday: 09:00 Paris is 07:00 UTC now
    assert mon == datetime(2026, 3, 30, 7, tzinfo=UTC)
    assert latest_slot(t, 0, mon) == mon


def test_interval_and_one_off_slots() -> None:
    every = parse_timing(every="2s")
    anchor = 1000.4
    assert latest_slot(every, anchor, datetime.fromtimestamp(1005.9, UTC)) == datetime.fromtimestamp(1004, UTC)
    assert next_slot(every, anchor, datetime.fromtimestamp(1004, UTC)) == datetime.fromtimestamp(1006, UTC)
    assert latest_slot(every, anchor, datetime.fromtimestamp(999, UTC)) is None
    once = parse_timing(at="2026-06-02T10:00", tz="America/New_York")
    assert once.at == datetime(2026, 6, 2, 10, tzinfo=ZoneInfo("America/New_York"))
    assert latest_slot(once, 0, datetime(2026, 6, 2, 13, 59, tzinfo=UTC)) is None
    assert latest_slot(once, 0, datetime(2026, 6, 2, 14, tzinfo=UTC)) == datetime(2026, 6, 2, 14, tzinfo=UTC)
    assert next_slot(once, 0, datetime(2026, 6, 2, 14, tzinfo=UTC)) is None


def test_slot_ids_are_utc_compact_and_round_trip() -> None:
    slot = datetime(2026, 3, 30, 9, tzinfo=ZoneInfo("Europe/Paris"))
    assert slot_id(slot) == "20260330T070000Z"
    assert parse_slot_id("20260330T070000Z") == slot


@pytest.mark.parametrize("kwargs", [
    {}, {"cron": "* * * * *", "every": 5}, {"cron": "61 * * * *"}, {"cron": "* * * * * *"},
    {"every": "1.5s"}, {"every": 0}, {"at": "next tuesday"}, {"cron": "0 9 * * *", "tz": "Mars/Olympus"},
])
def test_bad_timings_are_refused(kwargs: dict) -> None:
    with pytest.raises(InvalidInput):
        parse_timing(**kwargs)


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:6379/a.wav", "127.0.0.1, a loopback address"),
    ("http://[::1]/a.wav", "::1, a loopback address"),
    ("http://[::ffff:10.0.0.5]/a.wav", "a private address"),  # IPv4-mapped: judged as the IPv4 address
    ("http://10.1.2.3/a.wav", "10.1.2.3, a private address"),
    ("http://169.254.169.254/latest/meta-data", "a link-local address"),
    ("http://0.0.0.0/a.wav", "0.0.0.0, a unspecified address"),
    ("http://localhost:8080/a.wav", "a loopback address"),  # a name: resolved, not fetched
    ("http://exa mple.com/a.wav", "a space or a control character"),
    ("http:///a.wav", "it has no host"),
    ("http://example.com:99999/a.wav", "not a URL echoq can fetch"),
])
def test_audio_urls_are_refused_up_front_by_the_fetch_policy(url: str, why: str) -> None:
    data = {"conversation": "c", "lines": [{"text": "first"}, {"audio": url}]}
    with pytest.raises(ScriptError) as err:
        parse_script(data)
    (problem,) = err.value.problems
    assert (problem.line, problem.field) == (2, "audio") and why in problem.message, problem.message


def test_a_public_or_allowed_audio_url_passes_without_being_fetched(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.settings import get_settings

    # 192.0.2.0/24 is documentation space: refused, and no fetch could reach it anyway
    doc, public = "http://192.0.2.7/a.wav", "https://93.184.216.34/clips/a.wav"
    assert parse_script({"conversation": "c", "lines": [{"audio": public}]}).lines[0].audio == public
    with pytest.raises(ScriptError, match="192.0.2.7, a private address"):
        parse_script({"conversation": "c", "lines": [{"audio": doc}]})
    # without the audio check a name is not resolved, but an address is still judged
    named = {"conversation": "c", "lines": [{"audio": "http://localhost/a.wav"}]}
    assert parse_script(named, check_audio=False).lines[0].audio == "http://localhost/a.wav"
    with pytest.raises(ScriptError, match="loopback"):
        parse_script({"conversation": "c", "lines": [{"audio": "http://127.0.0.1/a.wav"}]}, check_audio=False)
    monkeypatch.setenv("ECHOQ_FETCH_ALLOW_HOSTS", "127.0.0.1,192.0.2.0/24")
    get_settings.cache_clear()
    try:
        for url in ("http://127.0.0.1/a.wav", doc):
            assert parse_script({"conversation": "c", "lines": [{"audio": url}]}).lines[0].audio == url
    finally:
        monkeypatch.delenv("ECHOQ_FETCH_ALLOW_HOSTS")
        get_settings.cache_clear()


def test_a_new_conversations_name_follows_the_text_rule() -> None:
    data = {"conversation": {"persona_id": "p1", "name": "Morning\x1b[31m"}, "lines": ["hi"]}
    with pytest.raises(ScriptError) as err:
        parse_script(data)
    (problem,) = err.value.problems
    assert problem.field == "conversation.name" and "U+001B at index 7" in problem.message


def test_script_validate_refuses_an_internal_audio_url_and_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from producer.cli.main import main

    path = tmp_path / "s.yaml"
    path.write_text("conversation: c\nlines:\n  - text: hello\n  - audio: http://127.0.0.1:6379/x.wav\n")
    assert main(["script", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "line 2 (file line 4): audio: refused to fetch http://127.0.0.1:6379/x.wav" in err and "loopback" in err
    path.write_text("conversation: c\nlines:\n  - text: hello\n  - audio: https://93.184.216.34/x.wav\n")
    assert main(["script", "validate", str(path)]) == 0
    assert "ok, 2 line(s)" in capsys.readouterr().out
