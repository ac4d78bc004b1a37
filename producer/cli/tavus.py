"""``echoq tavus``: echo personas and conversations on Tavus, from the command line.

    echoq tavus persona create NAME [--system-prompt ...] [--default-replica-id ...] [--microphone]
    echoq tavus persona list | get PERSONA_ID
    echoq tavus conversation create --persona-id ID [--replica-id ...] [--name ...] [--callback-url ...]
                                    [--private] [--test-mode] [--audio-only] [--greeting ...] [--context ...]
    echoq tavus conversation get | end | delete CONVERSATION_ID

The key comes from ``TAVUS_API_KEY``, the base URL from ``ECHOQ_TAVUS_BASE_URL``. Output is one
human-readable line per fact, or JSON with ``--json``. Exit codes: 0 ok; 2 usage or bad input
(including a missing key); 3 Tavus refused the request (a 4xx other than 429); 4 Tavus is
unavailable or rate limiting (5xx, 429, connection error, timeout): trying later may help.
Errors go to stderr as one line, never a traceback, never the key.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from worker.errors import ConfigError, InvalidInput, PermanentError, RetryableError
from worker.settings import get_settings

from ..tavus import TavusClient, TavusConfigError, TavusError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4

_EPILOG = (
    "Needs TAVUS_API_KEY; ECHOQ_TAVUS_BASE_URL overrides https://tavusapi.com/v2. "
    "Exit codes: 0 ok, 2 usage or bad input, 3 Tavus refused the request (4xx), "
    "4 Tavus unavailable or rate limiting (5xx, 429, connection, timeout)."
)

Handler = Callable[[argparse.Namespace], int]


def client_from_env(**kwargs: Any) -> TavusClient:
    """A :class:`TavusClient` from echoq's settings (``TAVUS_API_KEY``, ``ECHOQ_TAVUS_BASE_URL``);
    ``kwargs`` (timeout, max_retries, ...) go to the client. Raises :class:`TavusConfigError`
    when there is no key."""
    return TavusClient.from_settings(get_settings(), **kwargs)


# --- handlers -----------------------------------------------------------------------------------


def cmd_persona_create(args: argparse.Namespace) -> int:
    """Create an echo persona and print its id."""
    extra: dict[str, Any] = {}
    if args.context is not None:
        extra["context"] = args.context
    if args.default_replica_id is not None:
        extra["default_replica_id"] = args.default_replica_id
    if args.microphone:
        # The transport settings microphone echo needs: a setting, since Tavus does not document them.
        extra["layers"] = get_settings().tavus_microphone_layers
    with _client(args) as client:
        persona = client.create_persona(args.name, system_prompt=args.system_prompt, **extra)
    _emit(args, persona, _fields(persona, first=("persona_id", "persona_name")))
    return EXIT_OK


def cmd_persona_list(args: argparse.Namespace) -> int:
    """List personas, one per line."""
    with _client(args) as client:
        answer = client.list_personas(limit=args.limit, page=args.page)
    personas = answer.get("data") or []
    lines = [
        "\t".join(str(p.get(k) or "-") for k in ("persona_id", "pipeline_mode", "persona_name"))
        for p in personas
        if isinstance(p, dict)
    ]
    _emit(args, answer, "\n".join(lines) if lines else "no personas")
    return EXIT_OK


def cmd_persona_get(args: argparse.Namespace) -> int:
    """Show one persona."""
    with _client(args) as client:
        persona = client.get_persona(args.persona_id)
    _emit(args, persona, _fields(persona, first=("persona_id", "persona_name", "pipeline_mode")))
    return EXIT_OK


def cmd_conversation_create(args: argparse.Namespace) -> int:
    """Start a conversation and print its id, status and room URL."""
    properties: dict[str, Any] = {}
    if args.properties is not None:
        try:
            parsed = json.loads(args.properties)
        except ValueError as exc:
            return _usage(f"--properties is not valid JSON: {exc}")
        if not isinstance(parsed, dict):
            return _usage("--properties must be a JSON object")
        properties.update(parsed)
    for name in ("max_call_duration", "participant_left_timeout", "participant_absent_timeout"):
        value = getattr(args, name)
        if value is not None:
            properties[name] = value
    with _client(args) as client:
        conv = client.create_conversation(
            args.persona_id,
            replica_id=args.replica_id,
            conversation_name=args.name,
            callback_url=args.callback_url,
            properties=properties or None,
            **_create_options(args),
        )
    # A private room's meeting token is a secret: never printed (open it with `echoq start --private`).
    conv.pop("meeting_token", None)
    _emit(args, conv, _fields(conv, first=("conversation_id", "status", "conversation_url")))
    return EXIT_OK


def _create_options(args: argparse.Namespace) -> dict[str, Any]:
    """The create options shared by ``conversation create`` and ``start``."""
    return {"require_auth": True if args.private else None, "test_mode": True if args.test_mode else None,
            "audio_only": True if args.audio_only else None, "custom_greeting": args.greeting,
            "conversational_context": args.conversation_context}


def cmd_conversation_get(args: argparse.Namespace) -> int:
    """Show one conversation."""
    with _client(args) as client:
        conv = client.get_conversation(args.conversation_id)
    _emit(args, conv, _fields(conv, first=("conversation_id", "status", "conversation_url")))
    return EXIT_OK


def cmd_conversation_end(args: argparse.Namespace) -> int:
    """End a conversation."""
    with _client(args) as client:
        answer = client.end_conversation(args.conversation_id)
    data = {"conversation_id": args.conversation_id, "status": "ended", **answer}
    _emit(args, data, f"ended {args.conversation_id}")
    return EXIT_OK


def cmd_conversation_delete(args: argparse.Namespace) -> int:
    """Delete a conversation."""
    with _client(args) as client:
        client.delete_conversation(args.conversation_id)
    _emit(args, {"conversation_id": args.conversation_id, "deleted": True}, f"deleted {args.conversation_id}")
    return EXIT_OK


# --- plumbing -----------------------------------------------------------------------------------


def cmd_start(args: argparse.Namespace) -> int:
    """Create a conversation on Tavus from an echo persona, open it in echoq, print its room URL."""
    from worker import sealing
    from worker.errors import EchoqError

    from ..client import EchoqClient

    echoq = EchoqClient()
    if args.private:
        # refuse before creating anything: the token could not be kept without the key
        sealing.seal("check", echoq.settings.secret_key)
    with _client(args) as client:
        conv = client.create_conversation(args.persona, replica_id=args.replica_id, conversation_name=args.name,
                                          **_create_options(args))
    cid, url = str(conv["conversation_id"]), str(conv["conversation_url"])
    token = conv.pop("meeting_token", None)
    try:
        echoq.open(cid, url, mode=args.mode, meeting_token=str(token) if token else None)
    except EchoqError as exc:
        # the conversation exists on Tavus now: say how to finish by hand rather than lose it
        how = " with its meeting token (?t=…)" if token else ""
        print(f"echoq start: conversation {cid} was created on Tavus ({url}) but not opened in echoq: {exc}\n"
              f"open it later{how} with: echoq open {cid} --url {url}", file=sys.stderr)
        return EXIT_UNAVAILABLE if isinstance(exc, RetryableError) else EXIT_FAILED
    _emit(args, {"conversation_id": cid, "conversation_url": url, "mode": args.mode, "status": conv.get("status"),
                 "private": bool(token)}, url)
    if not args.json:
        print(f"conversation {cid} is open in echoq ({args.mode}); join the room above, then for example:\n"
              f"  echoq say {cid} \"Hello there!\"", file=sys.stderr)
    return EXIT_OK


def _add_create_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--private", action="store_true",
                   help="require_auth: a private room joined with a meeting token (never printed)")
    p.add_argument("--test-mode", action="store_true", help="test_mode: no replica joins, nothing is billed")
    p.add_argument("--audio-only", action="store_true", help="audio_only: no video")
    p.add_argument("--greeting", help="custom_greeting: what the replica says first")
    p.add_argument("--conversation-context", help="conversational_context")


def _client(args: argparse.Namespace) -> TavusClient:
    kwargs: dict[str, Any] = {}
    if getattr(args, "timeout", None) is not None:
        kwargs["timeout"] = args.timeout
    if getattr(args, "retries", None) is not None:
        kwargs["max_retries"] = args.retries
    return client_from_env(**kwargs)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)


def _fields(record: dict[str, Any], first: tuple[str, ...] = ()) -> str:
    """``key: value`` lines, the most useful keys first; nested values as compact JSON."""
    keys = [k for k in first if k in record] + sorted(k for k in record if k not in first)
    lines = []
    for key in keys:
        value = record[key]
        shown = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
        lines.append(f"{key}: {'-' if shown is None else shown}")
    return "\n".join(lines)


def _usage(message: str) -> int:
    print(f"echoq tavus: {message}", file=sys.stderr)
    return EXIT_USAGE


def _guarded(func: Handler) -> Handler:
    """Run a handler, turning every error into one stderr line and an exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (TavusConfigError, ConfigError) as exc:  # no key, or no ECHOQ_SECRET_KEY for --private
            return _usage(str(exc))
        except InvalidInput as exc:  # text that breaks the text rule, refused before any request
            return _usage(str(exc))
        except RetryableError as exc:
            print(f"echoq tavus: {exc}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        except (PermanentError, TavusError) as exc:
            print(f"echoq tavus: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        except ValueError as exc:  # bad ids and names caught before any request
            return _usage(str(exc))
        except Exception as exc:  # a bug: still one line and no traceback that could show settings
            print(f"echoq tavus: unexpected error ({type(exc).__name__})", file=sys.stderr)
            return EXIT_FAILED

    run.__name__ = func.__name__
    run.__doc__ = func.__doc__
    return run


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    common.add_argument(
        "--timeout",
        type=_positive,
        default=None,
        metavar="SECONDS",
        help="timeout of each HTTP attempt (default 10)",
    )
    common.add_argument(
        "--retries",
        type=_not_negative,
        default=None,
        metavar="N",
        help="retries on connection errors, 429 and 5xx (default 4)",
    )
    return common


def _command(
    sub: Any, name: str, func: Handler, help_: str, common: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help_, description=help_, epilog=_EPILOG, parents=[common]
    )
    p.set_defaults(func=_guarded(func))
    return p


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``tavus`` with ``persona create|list|get`` and ``conversation create|get|end|delete``,
    and ``start``: from nothing to a replica waiting for scripted speech in one step."""
    common = _common()
    p = _command(
        subparsers,
        "start",
        cmd_start,
        "create a Tavus conversation from an echo persona, open it in echoq, print the URL to join",
        common,
    )
    p.add_argument("--persona", required=True, metavar="PERSONA_ID", help="the echo persona (pipeline_mode echo)")
    p.add_argument("--replica-id", help="the replica (default: the persona's default replica)")
    p.add_argument("--name", help="conversation_name")
    p.add_argument("--mode", choices=("echo", "microphone"), default="echo", help="echo (default) or microphone")
    _add_create_options(p)
    tavus = subparsers.add_parser(
        "tavus",
        help="manage Tavus echo personas and conversations (REST API)",
        description="Create echo personas and start, inspect, end and delete Tavus conversations.",
        epilog=_EPILOG,
    )
    groups = tavus.add_subparsers(dest="tavus_group", metavar="{persona,conversation}")
    groups.required = True

    persona = groups.add_parser(
        "persona", help="echo personas", description="Create, list and show personas.", epilog=_EPILOG
    )
    psub = persona.add_subparsers(dest="tavus_command", metavar="{create,list,get}")
    psub.required = True

    p = _command(psub, "create", cmd_persona_create, "create an echo persona (pipeline_mode echo)", common)
    p.add_argument("name", help="persona_name")
    p.add_argument("--system-prompt", help="system prompt (unused by echo mode, kept on the persona)")
    p.add_argument("--context", help="context text stored on the persona")
    p.add_argument("--default-replica-id", help="replica used when a conversation names none")
    p.add_argument("--microphone", action="store_true",
                   help="with the transport layers microphone echo needs (ECHOQ_TAVUS_MICROPHONE_LAYERS)")

    p = _command(psub, "list", cmd_persona_list, "list personas: id, pipeline mode, name", common)
    p.add_argument("--limit", type=_not_negative, help="personas per page")
    p.add_argument("--page", type=_not_negative, help="page number")

    p = _command(psub, "get", cmd_persona_get, "show one persona", common)
    p.add_argument("persona_id")

    conversation = groups.add_parser(
        "conversation",
        help="conversations (Daily rooms with a replica)",
        description="Start, show, end and delete conversations.",
        epilog=_EPILOG,
    )
    csub = conversation.add_subparsers(dest="tavus_command", metavar="{create,get,end,delete}")
    csub.required = True

    p = _command(
        csub,
        "create",
        cmd_conversation_create,
        "start a conversation; prints conversation_id, status and conversation_url",
        common,
    )
    p.add_argument("--persona-id", required=True, help="the (echo) persona to use")
    p.add_argument("--replica-id", help="the replica (default: the persona's default replica)")
    p.add_argument("--name", help="conversation_name")
    p.add_argument("--callback-url", help="URL Tavus posts conversation events to")
    p.add_argument(
        "--max-call-duration",
        dest="max_call_duration",
        type=_not_negative,
        metavar="SECONDS",
        help="properties.max_call_duration",
    )
    p.add_argument(
        "--participant-left-timeout",
        dest="participant_left_timeout",
        type=_not_negative,
        metavar="SECONDS",
        help="properties.participant_left_timeout",
    )
    p.add_argument(
        "--participant-absent-timeout",
        dest="participant_absent_timeout",
        type=_not_negative,
        metavar="SECONDS",
        help="properties.participant_absent_timeout",
    )
    p.add_argument(
        "--properties",
        metavar="JSON",
        help="more properties as a JSON object (the options above win over its keys)",
    )
    _add_create_options(p)

    for name, func, help_ in (
        ("get", cmd_conversation_get, "show one conversation: status, room URL, ..."),
        ("end", cmd_conversation_end, "end a conversation (its room closes)"),
        ("delete", cmd_conversation_delete, "delete a conversation"),
    ):
        p = _command(csub, name, func, help_, common)
        p.add_argument("conversation_id")
