"""Records as Redis holds them (every field a string) become typed values in one place, and read
as text for people: no Python reprs, times in ISO-8601 UTC. Progress never shows more sent than
a total. Bad settings are one line and exit 2 for every command, before anything runs."""

from __future__ import annotations

import re

import pytest

from producer.cli.human import record_text
from producer.cli.main import main
from producer.records import conversation_record, event_record, iso_utc, utterance_record
from worker.chunks import progress_text

#: an utterance record exactly as a Redis hash hands it back (after decoding)
RAW_UTTERANCE = {
    "id": "u1", "conversation_id": "c1", "inference_id": "u1", "kind": "audio", "state": "spoken", "seq": "3",
    "sample_rate": "24000", "duration_in": "0.8", "chunks_estimate": "21", "chunks_sent": "20", "chunks_total": "20",
    "enqueued_at": "1796161581.816442", "sent_at": "1796161582.5", "spoken_at": "1796161583.25", "duration": "0.8",
    "replica_outcome": "spoken", "error": "",
}


def test_utterance_fields_become_numbers_and_times_epoch_seconds() -> None:
    rec = utterance_record(RAW_UTTERANCE)
    assert rec["seq"] == 3 and rec["sample_rate"] == 24000 and rec["chunks_sent"] == 20 and rec["chunks_total"] == 20
    assert rec["chunks_estimate"] == 21
    assert rec["duration"] == 0.8 and rec["duration_in"] == 0.8
    assert rec["enqueued_at"] == 1796161581.816442 and isinstance(rec["sent_at"], float)
    assert rec["state"] == "spoken" and rec["inference_id"] == "u1" and rec["error"] == ""  # text stays text
    assert utterance_record({"id": "t", "chars": "12", "duration": ""}) == {"id": "t", "chars": 12, "duration": None}


def test_conversation_and_event_records_are_typed_too() -> None:
    conv = conversation_record({"id": "c1", "created_at": "1796161581.5", "interrupt_gen": "2", "last_error": "",
                                "cursor": {"seq": 3, "chunk": 0}})
    assert conv == {"id": "c1", "created_at": 1796161581.5, "interrupt_gen": 2, "last_error": "",
                    "cursor": {"seq": 3, "chunk": 0}}
    event = event_record({"type": "replica.stopped", "ts": 1796161583.25, "seq": None, "duration": "1.24",
                          "interrupted": "false"})
    assert event == {"type": "replica.stopped", "ts": 1796161583.25, "seq": None, "duration": 1.24, "interrupted": False}


def test_iso_utc() -> None:
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1796161581.816442) == "2026-12-01T21:46:21.816Z"
    assert iso_utc(None) is None


def test_show_text_has_no_python_reprs_and_iso_times() -> None:
    conv = conversation_record({"id": "demo", "url": "loopback://demo", "mode": "echo", "state": "open",
                                "created_at": "1796161581.816442", "opened_at": "1796161581.816442"})
    conv.update(owner=None, backlog=0, utterances=3, cursor={"seq": 3, "chunk": 0}, current_utterance=None)
    text = record_text(conv)
    assert not re.search(r"[{}\[\]']|None", text), text
    lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in text.splitlines())
    assert lines["cursor"] == "utterance 3 done, next chunk 0"
    assert lines["current_utterance"] == "-" and lines["owner"] == "-"
    assert lines["created_at"] == "2026-12-01T21:46:21.816Z"
    assert text.splitlines()[0].split() == ["id", "demo"]  # the important fields first

    status = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in record_text(utterance_record(RAW_UTTERANCE)).splitlines())
    assert status["duration"] == "0.80 s" and status["sent_at"] == "2026-12-01T21:46:22.500Z"


@pytest.mark.parametrize("sent, total, estimate, shown", [
    (12, None, 75, "12/~75"),     # estimated while sending
    (75, 75, 75, "75/75"),        # known once the last chunk is sent
    (476, None, 501, "476/~501"),  # an MP3's estimate a little high: still marked as one
    (500, 500, 501, "500/500"),
    (101, None, 75, "101"),       # an estimate too low is dropped, never 101/75
    (80, 75, None, "80"),         # never more sent than a total shown
    (3, None, None, "3"),
])
def test_progress_shows_a_total_only_when_known_or_marked_estimate(sent: int, total: int | None,
                                                                    estimate: int | None, shown: str) -> None:
    assert progress_text(sent, total, estimate) == shown


@pytest.mark.parametrize("argv", [
    ["say", "c1", "hi"], ["show", "c1"], ["status", "u1"], ["play", "c1", "x.wav"], ["worker"], ["beat"],
    ["flower", "--no-auth"], ["api", "--no-auth"], ["simulate", "--out", "x"], ["schedule", "list"],
    ["script", "run", "x.yaml"],
])
@pytest.mark.parametrize("url", ["not-a-url", "http://localhost:6379", "redis://localhost:notaport/0"])
def test_a_bad_redis_url_is_one_line_and_exit_2_for_every_command(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str],
                                                                    argv: list[str], url: str) -> None:
    from worker.settings import get_settings

    monkeypatch.setenv("ECHOQ_REDIS_URL", url)
    get_settings.cache_clear()
    try:
        assert main(argv) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("echoq: ECHOQ_REDIS_URL is not a"), err
    assert url not in err  # a URL may carry a password: never echoed


def test_any_bad_setting_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from worker.settings import get_settings

    monkeypatch.setenv("ECHOQ_CHUNK_MS", "forty")
    get_settings.cache_clear()
    try:
        assert main(["show", "c1"]) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert err.startswith("echoq: bad settings: ECHOQ_CHUNK_MS: ") and err.count("\n") == 1, err
