"""The Daily transport against a real room with the real daily-python.

Runs only when ``ECHOQ_TEST_DAILY_URL`` names a room (with ``?t=TOKEN`` if the room needs one);
it skips otherwise, under CI too, because CI has no Daily room. The session runs in a fresh
subprocess so that ``Daily.init()`` happens there and never in the pytest process, which may
fork.

``ECHOQ_TEST_DAILY_REPLICA=1`` also waits for the replica (``ECHOQ_REPLICA_USER_NAME`` or any
participant) before sending; ``ECHOQ_TEST_CONVERSATION_ID`` sets the message's conversation id.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOM_URL = os.environ.get("ECHOQ_TEST_DAILY_URL", "")

SESSION = textwrap.dedent(
    """
    import os, uuid

    from worker.echo import text_echo
    from worker.settings import Settings
    from worker.transports.daily import DailyTransport, shutdown_all

    settings = Settings()
    conversation_id = os.environ.get("ECHOQ_TEST_CONVERSATION_ID", "echoq-test")
    transport = DailyTransport(os.environ["ECHOQ_TEST_DAILY_URL"], settings=settings)
    try:
        transport.join(settings.join_timeout_s)
        if os.environ.get("ECHOQ_TEST_DAILY_REPLICA") == "1":
            transport.wait_for_replica(settings.replica_wait_timeout_s)
        message = text_echo(
            conversation_id,
            "Hello from the echoq integration test.",
            uuid.uuid4().hex,
            max_bytes=settings.max_message_bytes,
        )
        transport.send(message)
        print("SENT", flush=True)
    finally:
        transport.leave()
        shutdown_all()
    print("LEFT", flush=True)
    """
)


@pytest.mark.daily
@pytest.mark.skipif(not ROOM_URL, reason="set ECHOQ_TEST_DAILY_URL to a Daily room to run")
def test_real_room_join_send_leave() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", SESSION],
        cwd=root,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=180,
    )
    # The output can quote the room; keep any token out of the report.
    token_free = result.stdout + result.stderr
    for part in ROOM_URL.split("?", 1)[1:]:
        token_free = token_free.replace(part, "***")
    assert result.returncode == 0, token_free
    assert "SENT" in result.stdout and "LEFT" in result.stdout, token_free
