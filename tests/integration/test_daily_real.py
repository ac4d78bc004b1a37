"""The Daily transport against a real room with the real daily-python.

Runs only when ``ECHOQ_TEST_DAILY_URL`` names a room (with ``?t=TOKEN`` if the room needs one);
it skips otherwise, under CI too, because CI has no Daily room. The session runs in a fresh
subprocess so that ``Daily.init()`` happens there and never in the pytest process, which may
fork.

Sends go only to a room the replica is in, so someone must be in it: the replica of a Tavus
conversation URL (``ECHOQ_REPLICA_USER_NAME`` names it), or, with no name set, any participant
(join the room from a browser). ``ECHOQ_TEST_CONVERSATION_ID`` sets the message's conversation id
(default: the last segment of the room URL, as echoq does). The microphone test writes three
tones through the custom microphone track; every write must be taken whole.
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

    from worker.transports.urls import tavus_conversation_id

    settings = Settings()
    url = os.environ["ECHOQ_TEST_DAILY_URL"]
    conversation_id = os.environ.get("ECHOQ_TEST_CONVERSATION_ID") or tavus_conversation_id(url) or "echoq-test"
    transport = DailyTransport(url, settings=settings)
    try:
        transport.join(settings.join_timeout_s)
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


MICROPHONE = textwrap.dedent(
    """
    import numpy as np

    from worker import chunks
    from worker.settings import Settings
    from worker.transports.daily import DailyTransport, shutdown_all

    settings = Settings()
    rate = 24000
    transport = DailyTransport(os.environ["ECHOQ_TEST_DAILY_URL"], settings=settings)
    try:
        transport.join(settings.join_timeout_s)
        transport.wait_for_replica(settings.replica_wait_timeout_s)
        frames = 0
        for freq in (440, 660, 880):
            t = np.arange(rate // 2) / rate
            pcm = (0.3 * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()
            for frame in chunks.rechunk([pcm], chunks.chunk_bytes(rate, settings.mic_frame_ms)):
                transport.write_frames(frame, rate)  # raises on a short write
                frames += 1
        assert frames == 3 * 500 // settings.mic_frame_ms, frames
        print("WROTE ALL", flush=True)
    finally:
        transport.leave()
        shutdown_all()
    print("LEFT", flush=True)
    """
)


def _run(session: str) -> tuple[subprocess.CompletedProcess[str], str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", "import os\n" + session],
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
    return result, token_free


@pytest.mark.daily
@pytest.mark.skipif(not ROOM_URL, reason="set ECHOQ_TEST_DAILY_URL to a Daily room to run")
def test_real_room_join_send_leave() -> None:
    result, token_free = _run(SESSION)
    assert result.returncode == 0, token_free
    assert "SENT" in result.stdout and "LEFT" in result.stdout, token_free


@pytest.mark.daily
@pytest.mark.skipif(not ROOM_URL, reason="set ECHOQ_TEST_DAILY_URL to a Daily room to run")
def test_real_room_microphone_echo_takes_every_frame_in_order() -> None:
    result, token_free = _run(MICROPHONE)
    assert result.returncode == 0, token_free
    assert "WROTE ALL" in result.stdout and "LEFT" in result.stdout, token_free
