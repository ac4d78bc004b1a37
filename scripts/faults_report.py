"""Fault figures: runs the fault suite (tests/faults) and prints one table row per fault.

Each fault test writes its counts (utterances, chunks, lost, repeated, reordered, ...) and its
recovery time as a JSON line to the file named by ECHOQ_FAULTS_REPORT; this script sets that,
runs pytest on tests/faults, and renders the lines as the Markdown table kept in RELIABILITY.md,
with the machine (nproc, load average) and the date. With --write, the table replaces the part
of RELIABILITY.md between the "faults:begin" and "faults:end" markers.

    .venv/bin/python scripts/faults_report.py [--write] [-- extra pytest args]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"
COLUMNS = ("fault", "workers", "utterances", "chunks", "lost", "repeated", "reordered", "interleaved", "from_resumed",
           "outage_s", "recovery_s", "resumed_after_s", "note", "test")


def run_suite(extra: list[str]) -> tuple[list[dict[str, Any]], int, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "faults.jsonl"
        env = {**os.environ, "ECHOQ_FAULTS_REPORT": str(out)}
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults", *extra],
                             cwd=ROOT, env=env)
        wall = time.monotonic() - t0
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return rows, rc, wall


def render(rows: list[dict[str, Any]], wall: float) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} cores "
        f"(nproc), load average {load} at the end; the suite took {wall:.0f} s of wall time.",
        "Command: `.venv/bin/python scripts/faults_report.py --write`. A row whose test failed is marked ✗.",
        "",
        "| " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = []
        for c in COLUMNS:
            value = row.get(c, "")
            if c == "test":
                value = ("" if row.get("passed") else "✗ ") + str(value)
            cells.append("" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in RELIABILITY.md")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest after --")
    args = parser.parse_args()
    rows, rc, wall = run_suite(args.pytest_args)
    table = render(rows, wall)
    print(table)
    if args.write:
        doc = ROOT / "RELIABILITY.md"
        text = doc.read_text()
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        doc.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
