"""Every Redis key, queue and task name echoq uses, in one place."""

from __future__ import annotations

import re

PREFIX = "echoq"

# Celery
CONTROL_QUEUE = "echoq.control"
TASK_OPEN = "echoq.open"
TASK_DRAIN = "echoq.drain"
TASK_INTERRUPT = "echoq.interrupt"
TASK_CLOSE = "echoq.close"

CONVERSATION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
UTTERANCE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")

#: set of conversation ids that are open
CONVERSATIONS = f"{PREFIX}:conversations"
#: set of loopback room names that a transport has joined (the simulator watches these)
LOOPBACK_ROOMS = f"{PREFIX}:loopback:rooms"
#: present (with a short TTL) while a replica simulator runs
SIMULATOR_ALIVE = f"{PREFIX}:simulator:alive"
#: hash of worker node name -> heartbeat json
WORKERS = f"{PREFIX}:workers"


def interrupts_channel(db: int) -> str:
    """The pub/sub channel an interrupt's conversation id is published on, so its owner looks at
    once (channels are shared by every database of a server: this one's number is in the name)."""
    return f"{PREFIX}:interrupts:{db}"


def conv_queue(conversation_id: str) -> str:
    """The Celery queue only the owner of a conversation consumes."""
    return f"echoq.conv.{conversation_id}"


def conversation(conversation_id: str) -> str:
    """Hash: url, mode, state, created_at, closed_at, last_error, interrupt_upto, interrupt_gen."""
    return f"{PREFIX}:conv:{conversation_id}"


def conv_log(conversation_id: str) -> str:
    """List of entry JSON; the entry with seq N is at index N-1."""
    return f"{PREFIX}:conv:{conversation_id}:log"


def conv_cursor(conversation_id: str) -> str:
    """Hash: seq (last fully handled), chunk (next chunk of seq+1), interrupt_gen (last handled)."""
    return f"{PREFIX}:conv:{conversation_id}:cursor"


def conv_events(conversation_id: str) -> str:
    """Stream of delivery and replica events of one conversation."""
    return f"{PREFIX}:conv:{conversation_id}:events"


def wire(wire_id: str) -> str:
    """String: a Tavus conversation id (the wire id) -> the echoq conversation id that sends under it,
    kept only when the two differ."""
    return f"{PREFIX}:wire:{wire_id}"


def lease(conversation_id: str) -> str:
    """String: the owner's token, with a TTL."""
    return f"{PREFIX}:lease:{conversation_id}"


def utterance(utterance_id: str) -> str:
    """Hash: the utterance record."""
    return f"{PREFIX}:utt:{utterance_id}"


def blob(utterance_id: str) -> str:
    """String: the audio bytes of one utterance, with a TTL."""
    return f"{PREFIX}:blob:{utterance_id}"


def stream(utterance_id: str) -> str:
    """Stream of one streaming utterance's pieces as they arrive (fields ``d``, ``end``, ``open``, ``idle``, ``cut``)."""
    return f"{PREFIX}:stream:{utterance_id}"


def inference(inference_id: str) -> str:
    """String: inference_id -> utterance id, for mapping replica events."""
    return f"{PREFIX}:inf:{inference_id}"


def loopback_room(name: str) -> str:
    """Stream of app messages sent into a loopback room (field ``data``)."""
    return f"{PREFIX}:loopback:{name}"


def loopback_events(name: str) -> str:
    """Stream of room events coming back from a loopback room (field ``data``)."""
    return f"{PREFIX}:loopback:{name}:events"


def loopback_mic(name: str) -> str:
    """Stream of microphone frames written into a loopback room."""
    return f"{PREFIX}:loopback:{name}:mic"
