"""echoq producers: the Python client, the CLI, the HTTP API, the Tavus REST client, scripts and schedules."""

from .client import EchoqClient

__all__ = ["EchoqClient"]
