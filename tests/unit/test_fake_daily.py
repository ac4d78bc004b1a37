"""The daily double against what the real daily-python did.

``scripts/probe_daily.py`` ran against the installed SDK (offline) and stored what it saw in
``tests/doubles/daily_shapes.json``; here the same probe runs against the double, and the two
must agree. Run the probe again (``--write``) when daily-python changes.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

from tests.doubles.fake_daily import OFFLINE_JOIN_ERROR, FakeDaily

ROOT = Path(__file__).resolve().parents[2]


def _probe_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("probe_daily", ROOT / "scripts" / "probe_daily.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_double_shows_every_shape_the_real_sdk_showed() -> None:
    probe = _probe_module()
    expected = json.loads(probe.SHAPES_FILE.read_text())
    fake = FakeDaily()
    fake.join_error = OFFLINE_JOIN_ERROR  # offline, as when the shapes were recorded
    try:
        seen = probe.probe(fake, join_timeout=10.0)
    finally:
        fake.close()
    assert set(seen) == set(expected)
    for key in sorted(expected):
        assert seen[key] == expected[key], key


def test_the_recorded_shapes_hold_the_facts_the_transport_relies_on() -> None:
    # Guards against a re-recording that silently changes what the transport was built for.
    shapes = json.loads(_probe_module().SHAPES_FILE.read_text())
    assert shapes["send_before_join"][1][0] == "on_error"  # on_error fires for one failed request
    assert shapes["failed_join"]["order"][0][0] == "on_error"
    assert ["state", "joining"] not in shapes["failed_join"]["order"]
    assert shapes["leave_after_failed_join"]["order"][1] == ["completion", [None]]
    assert shapes["microphone_write_not_live"] == {"blocked": False, "frames": 0}
    assert shapes["custom_source_write_100ms"] == {"blocked": True, "frames": 2400}
    assert shapes["send_app_message_serialize_none"] == "TypeError"
