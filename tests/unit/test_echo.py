"""Echo wire messages, byte for byte."""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from worker import chunks, echo
from worker.errors import MessageTooLarge, TextTooLong
from worker.settings import Settings


def test_text_echo_is_exactly_the_quickstart_message_with_a_boolean_done() -> None:
    msg = echo.text_echo("c123", "Hello there!", "inf-1", max_bytes=4096)
    assert echo.encode(msg) == (
        b'{"message_type":"conversation","event_type":"conversation.echo","conversation_id":"c123",'
        b'"properties":{"modality":"text","text":"Hello there!","inference_id":"inf-1","done":true}}'
    )


def test_audio_echo_carries_base64_pcm_an_integer_rate_and_done() -> None:
    pcm = bytes(range(256)) * 4
    msg = echo.audio_echo("c1", pcm, 16000, "inf", False, max_bytes=4096)
    props = msg["properties"]
    assert base64.b64decode(props["audio"]) == pcm
    assert props["sample_rate"] == 16000 and type(props["sample_rate"]) is int
    assert props["done"] is False
    assert echo.audio_echo("c1", pcm, 24000, "inf", True, max_bytes=4096)["properties"]["done"] is True
    with pytest.raises(ValueError, match="16000 or 24000"):
        echo.audio_echo("c1", pcm, 44100, "inf", True, max_bytes=4096)


@pytest.mark.parametrize("ids", [("conv-1", "inf-1"), ('c"q\\uote', "i\n\u2028\x00"), ("ünïcode 会话", "😀"),
                                 (str(uuid.uuid4()), str(uuid.uuid4()))])
@pytest.mark.parametrize("rate", [16000, 24000])
@pytest.mark.parametrize("done", [False, True])
def test_an_audio_chunk_made_with_its_json_encodes_as_the_json_encoder_would(ids: tuple[str, str], rate: int,
                                                                             done: bool) -> None:
    """The audio message's JSON is put together when it is built; the bytes a room gets must be
    exactly the compact JSON of the dict (what the size limit counts, what Daily would send)."""
    import os

    for size in (0, 1, 2, 3, 1920, 1281):
        pcm = os.urandom(size)
        message = echo.audio_echo(ids[0], pcm, rate, ids[1], done, max_bytes=1 << 20)
        assert echo.encode(message) == json.dumps(dict(message), separators=(",", ":"), ensure_ascii=False).encode()
        assert json.loads(echo.encode(message)) == message
        assert base64.b64decode(message["properties"]["audio"]) == pcm


@pytest.mark.parametrize("change", [{"done": "true"}, {"sample_rate": 44100.0}, {"done": 1}, {"audio": 'a"b'},
                                    {"audio": "a\\b"}, {"audio": "a\nb"}, {"audio": "é"}, {"inference_id": 5},
                                    {"modality": "text"}, {"extra": True}])
def test_a_message_changed_after_it_was_built_encodes_as_it_is_now(change: dict[str, object]) -> None:
    """Tests (and the simulator's checks) send deliberately broken messages: the bytes must be
    those of the dict as it is, whatever shape or content it has."""
    message = echo.audio_echo("c", b"\0\1" * 100, 24000, "i", False, max_bytes=1 << 20)
    message["properties"].update(change)
    assert echo.encode(message) == json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    assert json.loads(echo.encode(message))["properties"] == message["properties"]


def test_the_default_chunk_fits_the_default_limit_at_24k_with_long_ids() -> None:
    s = Settings()
    pcm = b"\x01\x02" * (chunks.chunk_bytes(24000, s.chunk_ms) // 2)
    msg = echo.audio_echo("c" * 64, pcm, 24000, str(uuid.uuid4()), False, max_bytes=s.max_message_bytes)
    assert len(echo.encode(msg)) <= s.max_message_bytes == 4096


def test_a_message_over_the_limit_is_refused() -> None:
    pcm = b"\0" * chunks.chunk_bytes(24000, 100)  # 100 ms at 24 kHz is about 6.6 KB as JSON
    with pytest.raises(MessageTooLarge, match="over the limit of 4096"):
        echo.audio_echo("c1", pcm, 24000, "inf", False, max_bytes=4096)


def test_text_that_cannot_fit_one_message_is_refused_with_the_rule() -> None:
    fits = "a" * echo.max_text_bytes("c1", "inf", 4096)
    assert len(echo.encode(echo.text_echo("c1", fits, "inf", max_bytes=4096))) == 4096
    with pytest.raises(TextTooLong, match="split it into several utterances"):
        echo.text_echo("c1", fits + "a", "inf", max_bytes=4096)


def test_interrupt_has_no_properties() -> None:
    assert echo.interrupt("c9") == {
        "message_type": "conversation", "event_type": "conversation.interrupt", "conversation_id": "c9"}


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), ("true", True), ("false", False), ("TRUE", True)])
def test_done_strings_of_older_docs_normalise_to_booleans(value: object, expected: bool) -> None:
    assert echo.normalize_done(value) is expected


def test_done_rejects_anything_else() -> None:
    with pytest.raises(ValueError):
        echo.normalize_done("yes")


def test_validate_accepts_what_the_builders_make() -> None:
    assert echo.validate(echo.text_echo("c", "hi", "i", max_bytes=4096), max_bytes=4096) == []
    assert echo.validate(echo.audio_echo("c", b"\0\0", 24000, "i", True, max_bytes=4096), max_bytes=4096) == []
    assert echo.validate(echo.interrupt("c"), max_bytes=4096) == []


@pytest.mark.parametrize(
    "mutate,problem",
    [
        (lambda m: m["properties"].update(done="true"), "not a JSON boolean"),
        (lambda m: m["properties"].update(sample_rate=44100), "not the integer 16000 or 24000"),
        (lambda m: m["properties"].update(sample_rate="24000"), "not the integer 16000 or 24000"),
        (lambda m: m["properties"].update(audio="%%%"), "not base64"),
        (lambda m: m["properties"].update(audio=base64.b64encode(b"abc").decode()), "odd number of bytes"),
        (lambda m: m["properties"].pop("inference_id"), "inference_id missing"),
        (lambda m: m.update(event_type="conversation.respond"), "neither"),
        (lambda m: m.update(message_type="chat"), "message_type"),
        (lambda m: m["properties"].update(audio=base64.b64encode(b"\0" * 4000).decode()), "over 4096"),
    ],
)
def test_validate_names_each_problem(mutate: object, problem: str) -> None:
    msg = json.loads(json.dumps(echo.audio_echo("c", b"\0\0", 24000, "i", False, max_bytes=4096)))
    mutate(msg)  # type: ignore[operator]
    problems = echo.validate(msg, max_bytes=4096)
    assert any(problem in p for p in problems), problems
