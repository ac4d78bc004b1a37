"""The HTTP API (``echoq api``): ``app`` builds the FastAPI application, ``models`` holds the
request and response bodies, ``errors`` maps echoq's errors to HTTP answers, ``schedules`` adds
the ``/v1/schedules`` routes."""

from .app import OPEN_PATHS, body_limit_for, create_app

__all__ = ["OPEN_PATHS", "body_limit_for", "create_app"]
