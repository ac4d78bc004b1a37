"""echoq worker: everything that runs next to a room.

The public contract that producers may import is small: :mod:`worker.settings`,
:mod:`worker.keys`, :mod:`worker.errors`, :mod:`worker.store` and the Celery app in
:mod:`worker.celery_app` (for ``send_task``).
"""

__version__ = "0.1.0"
