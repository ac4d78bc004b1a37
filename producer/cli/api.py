"""``echoq api``: serve the HTTP API (:mod:`producer.api`) with uvicorn.

    echoq api [--host 127.0.0.1] [--port 8000] [--no-auth]

Bearer tokens come from ``ECHOQ_API_TOKENS`` (comma-separated). With none set the command
refuses to start, unless ``--no-auth`` says explicitly that anyone who can reach the port may
use the API. Tokens are never printed or logged.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from worker.settings import get_settings

EXIT_OK, EXIT_USAGE = 0, 2

_NO_TOKENS = (
    "echoq api: no API tokens: set ECHOQ_API_TOKENS to one or more comma-separated bearer tokens, "
    "or pass --no-auth to serve without authentication (only on a trusted network)"
)


def cmd_api(args: argparse.Namespace) -> int:
    """Start uvicorn with the API; returns when the server stops."""
    try:
        import uvicorn

        from ..api import create_app
    except ImportError as exc:
        print(f"echoq api: the HTTP API needs its extras: pip install 'echoq[api]' ({exc.name} is missing)",
              file=sys.stderr)
        return EXIT_USAGE
    from worker.logs import setup_logging

    settings = get_settings()
    tokens = settings.api_token_list
    if not tokens and not args.no_auth:
        print(_NO_TOKENS, file=sys.stderr)
        return EXIT_USAGE
    if args.no_auth:
        ignored = " (ECHOQ_API_TOKENS is ignored)" if tokens else ""
        print(f"echoq api: serving WITHOUT authentication on {args.host}:{args.port}{ignored}", file=sys.stderr)
    setup_logging(settings.log_level, settings.log_json)
    app = create_app(tokens=tokens, auth=not args.no_auth, settings=settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=(args.log_level or settings.log_level).lower(),
                server_header=False, access_log=False)  # the API logs one line per request itself
    return EXIT_OK


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError("must be 1-65535")
    return value


def register(subparsers: Any) -> None:
    """Add ``api``."""
    help_ = "serve the HTTP API (FastAPI + uvicorn); tokens from ECHOQ_API_TOKENS"
    p = subparsers.add_parser("api", help=help_, description=help_,
                              epilog="OpenAPI docs at /docs; GET /healthz needs no token.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    p.add_argument("--no-auth", action="store_true", help="serve without bearer tokens (trusted networks only)")
    p.add_argument("--log-level", help="uvicorn log level (default ECHOQ_LOG_LEVEL)")
    p.set_defaults(func=cmd_api)
