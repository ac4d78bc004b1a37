"""The demo's figures agree: messages on the wire, the simulator's report.json and the worker's
metrics, counted with the demo's own functions on a real run that ends with an interrupt (the
interrupt message is the one the demo used to miss)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

from tests.integration.conftest import ROOT, Workers, wait_for
from tests.integration.test_flower_browser import free_port
from tests.integration.test_observability import chirp_wav

pytestmark = pytest.mark.redis


def load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("echoq_demo", ROOT / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_wire_report_and_metrics_count_the_same_messages(workers: Workers, simulator: Any, client: Any,
                                                        redis_client: redis.Redis, tmp_path: Path) -> None:
    demo = load_demo()
    port = free_port()
    # paced sends: the chirp is still being sent when the interrupt comes
    workers.start(1, ECHOQ_METRICS_PORT=str(port), ECHOQ_MAX_MESSAGES_PER_SECOND="50")
    client.open("demo-count", "loopback://demo-count")
    said = demo.Spoken("hello", "text", client.say("demo-count", "Counting every message."))
    said.record = client.wait(said.uid, timeout=30, states=("spoken",))
    cut = demo.Spoken("chirp", "audio", client.play("demo-count", chirp_wav(tmp_path / "chirp.wav", 6.0)),
                      expect="interrupted")
    wait_for(lambda: (client.status(cut.uid).get("chunks_sent") or 0) > 10, 30, what="the chirp to be on its way")
    client.interrupt("demo-count")
    cut.record = client.wait(cut.uid, timeout=30, states=("interrupted",))

    report = demo.settled_report(redis_client, "demo-count", tmp_path / "sim", [said, cut])
    on_wire = report["on_wire"]
    kinds = [m["event_type"] for m in demo.wire(redis_client, "demo-count")]
    assert kinds[-1] == "conversation.interrupt" and kinds.count("conversation.interrupt") == 1
    assert report["rooms"]["demo-count"]["messages"] == on_wire
    metrics = wait_for(lambda: (m := demo._metric_counts(port)) and
                       sum(v for k, v in m.items() if k.endswith(" messages")) >= on_wire and m, 10,
                       what="the worker's metrics to count every message")
    assert sum(v for k, v in metrics.items() if k.endswith(" messages")) == on_wire
    assert metrics["interrupt messages"] == 1 and metrics["text messages"] == 1
