"""worker.metrics: every helper shows up in what Prometheus scrapes."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker import metrics


def _samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every exposed sample, keyed by name and sorted labels."""
    text = generate_latest(REGISTRY).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(name: str, **labels: str) -> float:
    return _samples().get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.parametrize("state", metrics.FINAL_STATES)
def test_utterance_finished_counts_by_state(state: str) -> None:
    before = _value("echoq_utterances_total", state=state)
    metrics.utterance_finished(state)
    assert _value("echoq_utterances_total", state=state) == before + 1


def test_final_states_are_zero_before_first_use() -> None:
    for state in metrics.FINAL_STATES:
        assert ("echoq_utterances_total", (("state", state),)) in _samples()


def test_utterance_finished_rejects_unknown_state() -> None:
    with pytest.raises(ValueError):
        metrics.utterance_finished("queued")


@pytest.mark.parametrize("kind", metrics.MESSAGE_KINDS)
def test_message_sent_counts_and_observes_latency(kind: str) -> None:
    sent = _value("echoq_messages_sent_total", kind=kind)
    count = _value("echoq_send_seconds_count")
    total = _value("echoq_send_seconds_sum")
    metrics.message_sent(kind, 0.02)
    assert _value("echoq_messages_sent_total", kind=kind) == sent + 1
    assert _value("echoq_send_seconds_count") == count + 1
    assert _value("echoq_send_seconds_sum") == pytest.approx(total + 0.02)


def test_message_sent_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError):
        metrics.message_sent("video", 0.01)


def test_send_retry_counts_by_reason() -> None:
    before = _value("echoq_send_retries_total", reason="ChannelNotOpen")
    metrics.send_retry("ChannelNotOpen")
    metrics.send_retry("ChannelNotOpen")
    assert _value("echoq_send_retries_total", reason="ChannelNotOpen") == before + 2


def test_first_message_fills_the_histogram() -> None:
    count = _value("echoq_first_audio_seconds_count")
    under_one = _value("echoq_first_audio_seconds_bucket", le="1.0")
    metrics.first_message(0.3)
    assert _value("echoq_first_audio_seconds_count") == count + 1
    assert _value("echoq_first_audio_seconds_bucket", le="1.0") == under_one + 1


def test_sessions_held_is_a_gauge() -> None:
    metrics.sessions_held(3)
    assert _value("echoq_sessions_held") == 3
    metrics.sessions_held(0)
    assert _value("echoq_sessions_held") == 0


def test_backlog_per_conversation_and_forget() -> None:
    metrics.backlog("conv-a", 7)
    metrics.backlog("conv-b", 2)
    assert _value("echoq_backlog", conversation_id="conv-a") == 7
    assert _value("echoq_backlog", conversation_id="conv-b") == 2

    metrics.forget_conversation("conv-a")
    samples = _samples()
    assert ("echoq_backlog", (("conversation_id", "conv-a"),)) not in samples
    assert samples[("echoq_backlog", (("conversation_id", "conv-b"),))] == 2

    metrics.forget_conversation("conv-a")  # forgetting twice is harmless
    metrics.forget_conversation("conv-b")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_start_server_zero_is_off() -> None:
    assert metrics.start_server(0) == 0


def test_start_server_serves_metrics_and_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ECHOQ_METRICS_HOST", raising=False)
    port = _free_port()
    served = metrics.start_server(port)
    assert served == port
    # A second call (say, a second worker_ready signal) does not try to bind again.
    assert metrics.start_server(_free_port()) == port

    metrics.sessions_held(5)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        body = resp.read().decode()
    assert "echoq_sessions_held 5.0" in body
    assert "echoq_utterances_total" in body
    assert "echoq_send_seconds_bucket" in body
    metrics.sessions_held(0)


def test_the_readme_lists_every_metric_a_worker_serves() -> None:
    """An operator reads the README's table to build dashboards: a metric missing there is one
    nobody finds."""
    from pathlib import Path

    from prometheus_client import REGISTRY

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    served = {m.name for m in REGISTRY.collect() if m.name.startswith("echoq_")}
    assert served, "no echoq metric registered"
    missing = [n for n in sorted(served)
               if f"`{n}`" not in readme and f"`{n}_total" not in readme and f"`{n}{{" not in readme]
    assert missing == [], f"not in README's metrics table: {missing}"
