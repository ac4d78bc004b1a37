"""The Celery app. Settings are chosen from PROTOCOL.md's Celery facts.

- Late acks and prefetch 1: a doorbell is acked after it ran; it is idempotent (the log and
  the cursor decide what is sent), so a redelivery finds nothing to do.
- Threads pool: sessions (and daily-python, which is not fork-safe) live in the worker process.
- Task events on, sent events on: Flower sees every task.
- Workers outlive a Redis restart: no cancelling of running tasks on connection loss.
"""

from __future__ import annotations

from celery import Celery

from . import keys
from .settings import get_settings

_settings = get_settings()

app = Celery("echoq", broker=_settings.broker, backend=_settings.redis_url, include=["worker.tasks"])
app.conf.update(
    task_default_queue=keys.CONTROL_QUEUE,
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_ignore_result=True,
    result_expires=3600,
    task_acks_late=True,
    task_reject_on_worker_lost=False,
    worker_prefetch_multiplier=1,
    # Off: on a broker reconnect this path crashes the worker (AttributeError on 'hostname',
    # celery#7185), so a Redis restart would kill every worker. A doorbell that runs twice after
    # a reconnect is harmless: the log, the cursor and the lease decide what is sent.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    # and a consumer that does not exit when closing the lost connection fails (worker/consumer.py)
    worker_consumer="worker.consumer:Consumer",
    worker_soft_shutdown_timeout=_settings.send_timeout_s,
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": 3600},
    task_track_started=True,
    # every worker also consumes its own queue (<node>.dq2): a worker that has just taken a
    # conversation rings itself there, since it starts reading the conversation's queue only on
    # its next poll (about a second later)
    worker_direct=True,
)
