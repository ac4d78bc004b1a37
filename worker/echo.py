"""Tavus echo wire messages: the only module that builds them, and the one check of them.

Pure: no I/O. Messages are dicts, exactly what is passed to ``send_app_message``; :func:`encode`
gives their compact JSON, whose length is what the size limit counts. An audio chunk's JSON is
put together around its base64, which needs no escaping, rather than scanned by the JSON encoder
(~20 us for a 40 ms chunk, and a chunk is encoded twice: its size check, the room's write); the
bytes are the same (a test holds them equal), and anything not of that exact shape goes through
the encoder.
"""

from __future__ import annotations

import base64
import functools
import json
from typing import Any

from .errors import MessageTooLarge, TextTooLong
from .settings import SAMPLE_RATES

MESSAGE_TYPE = "conversation"
ECHO = "conversation.echo"
INTERRUPT = "conversation.interrupt"
STARTED_SPEAKING = "conversation.replica.started_speaking"
STOPPED_SPEAKING = "conversation.replica.stopped_speaking"


_AUDIO_KEYS = ["message_type", "event_type", "conversation_id", "properties"]
_AUDIO_PROPERTIES = ["modality", "audio", "sample_rate", "inference_id", "done"]
_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def encode(message: dict[str, Any]) -> bytes:
    """Compact JSON, the form whose size the room limits."""
    audio = _encode_audio(message)
    if audio is not None:
        return audio
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


def _encode_audio(message: dict[str, Any]) -> bytes | None:
    """What :func:`encode` gives for an audio echo chunk as :func:`audio_echo` builds it, put
    together without scanning its base64; None for anything of another shape or content."""
    props = message.get("properties")
    if type(props) is not dict or list(message) != _AUDIO_KEYS or list(props) != _AUDIO_PROPERTIES:
        return None
    audio, rate, done = props["audio"], props["sample_rate"], props["done"]
    strings = (message["message_type"], message["event_type"], message["conversation_id"], props["inference_id"])
    if (props["modality"] != "audio" or type(rate) is not int or type(done) is not bool
            or any(type(v) is not str for v in strings) or type(audio) is not str or not audio.isascii()):
        return None
    body = audio.encode("ascii")
    if body.translate(None, _BASE64):  # anything but base64 might need escaping
        return None
    mt, et, cid, iid = map(_json_str, strings)
    return (b'{"message_type":%s,"event_type":%s,"conversation_id":%s,"properties":{"modality":"audio",'
            b'"audio":"%s","sample_rate":%d,"inference_id":%s,"done":%s}}'
            % (mt, et, cid, body, rate, iid, b"true" if done else b"false"))


@functools.lru_cache(maxsize=1024)
def _json_str(value: str) -> bytes:
    """A string as JSON (the ids of a room's messages repeat from chunk to chunk)."""
    return json.dumps(value, ensure_ascii=False).encode()


def _check_size(message: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    size = len(encode(message))
    if size > max_bytes:
        raise MessageTooLarge(f"message is {size} bytes, over the limit of {max_bytes}")
    return message


def text_echo(conversation_id: str, text: str, inference_id: str, *, max_bytes: int) -> dict[str, Any]:
    """One text echo: the whole utterance in one message, ``done`` true.

    Text that does not fit one message is refused (:class:`TextTooLong`) rather than split:
    Tavus documents no way to stream one text utterance over several messages.
    """
    message = {
        "message_type": MESSAGE_TYPE,
        "event_type": ECHO,
        "conversation_id": conversation_id,
        "properties": {"modality": "text", "text": text, "inference_id": inference_id, "done": True},
    }
    size = len(encode(message))
    if size > max_bytes:
        raise TextTooLong(
            f"text is too long for one echo message: {size} bytes as JSON, limit {max_bytes}; "
            "split it into several utterances"
        )
    return message


def audio_echo(
    conversation_id: str,
    pcm: bytes,
    sample_rate: int,
    inference_id: str,
    done: bool,
    *,
    max_bytes: int,
) -> dict[str, Any]:
    """One audio echo chunk: base64 of raw s16le mono PCM."""
    if sample_rate not in SAMPLE_RATES:
        raise ValueError(f"sample_rate must be 16000 or 24000, not {sample_rate}")
    message = {
        "message_type": MESSAGE_TYPE,
        "event_type": ECHO,
        "conversation_id": conversation_id,
        "properties": {
            "modality": "audio",
            "audio": base64.b64encode(pcm).decode("ascii"),
            "sample_rate": int(sample_rate),
            "inference_id": inference_id,
            "done": bool(done),
        },
    }
    return _check_size(message, max_bytes)


def interrupt(conversation_id: str) -> dict[str, Any]:
    """``conversation.interrupt``: no properties."""
    return {"message_type": MESSAGE_TYPE, "event_type": INTERRUPT, "conversation_id": conversation_id}


def max_text_bytes(conversation_id: str, inference_id: str, max_bytes: int) -> int:
    """How many bytes of JSON-escaped text fit one text echo message."""
    return max_bytes - len(encode(text_echo(conversation_id, "", inference_id, max_bytes=max_bytes)))


def largest_chunk_fits(conversation_id_len: int, inference_id_len: int, chunk_bytes: int, max_bytes: int) -> bool:
    """Whether an audio chunk of ``chunk_bytes`` PCM bytes fits a message, for settings checks."""
    msg = audio_echo("c" * conversation_id_len, b"\0" * chunk_bytes, 24000, "i" * inference_id_len, False, max_bytes=1 << 30)
    return len(encode(msg)) <= max_bytes


def normalize_done(value: Any) -> bool:
    """``done`` as a boolean: accepts true/false and the strings "true"/"false" of older docs."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"done must be a boolean or 'true'/'false', not {value!r}")


def validate(message: Any, *, max_bytes: int) -> list[str]:
    """Every way ``message`` breaks the echo protocol; empty when it is valid."""
    problems: list[str] = []
    if not isinstance(message, dict):
        return [f"message is {type(message).__name__}, not an object"]
    size = len(encode(message))
    if size > max_bytes:
        problems.append(f"message is {size} bytes, over {max_bytes}")
    if message.get("message_type") != MESSAGE_TYPE:
        problems.append(f"message_type is {message.get('message_type')!r}, not 'conversation'")
    if not isinstance(message.get("conversation_id"), str) or not message.get("conversation_id"):
        problems.append("conversation_id missing")
    event = message.get("event_type")
    if event == INTERRUPT:
        return problems
    if event != ECHO:
        problems.append(f"event_type {event!r} is neither {ECHO!r} nor {INTERRUPT!r}")
        return problems
    props = message.get("properties")
    if not isinstance(props, dict):
        return [*problems, "properties missing"]
    if not isinstance(props.get("inference_id"), str) or not props.get("inference_id"):
        problems.append("properties.inference_id missing")
    if not isinstance(props.get("done"), bool):
        problems.append(f"properties.done is {props.get('done')!r}, not a JSON boolean")
    modality = props.get("modality")
    if modality == "text":
        if not isinstance(props.get("text"), str) or not props["text"]:
            problems.append("properties.text missing or empty")
    elif modality == "audio":
        rate = props.get("sample_rate")
        if type(rate) is not int or rate not in SAMPLE_RATES:
            problems.append(f"properties.sample_rate is {rate!r}, not the integer 16000 or 24000")
        audio = props.get("audio")
        if not isinstance(audio, str):
            problems.append("properties.audio missing")
        else:
            try:
                pcm = base64.b64decode(audio, validate=True)
            except ValueError:
                problems.append("properties.audio is not base64")
            else:
                if len(pcm) % 2:
                    problems.append("properties.audio has an odd number of bytes (not s16le)")
    else:
        problems.append(f"properties.modality is {modality!r}, not 'text' or 'audio'")
    return problems
