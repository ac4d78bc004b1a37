"""The ``echoq`` command line: one module per group of commands (``main`` holds the parser and
the conversation commands; ``ops`` runs services; ``api``, ``script`` and ``tavus`` add theirs)."""

from .main import main

__all__ = ["main"]
