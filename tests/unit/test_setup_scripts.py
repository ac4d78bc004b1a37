"""What a newcomer runs first: scripts/compose with either Compose spelling, and packaging
metadata that needs no deprecated setuptools forms (which printed banners during set-up)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASH = shutil.which("bash") or "/bin/bash"


def fake_bin(tmp_path: Path, *, plugin: bool, standalone: bool) -> Path:
    """A PATH directory with a ``docker`` (with or without the compose plugin) and maybe ``docker-compose``;
    each prints how it was called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text("#!/bin/sh\n"
                      f'if [ "$1 $2" = "compose version" ]; then exit {0 if plugin else 1}; fi\n'
                      'echo "docker $*"\n')
    docker.chmod(0o755)
    if standalone:
        compose = bin_dir / "docker-compose"
        compose.write_text('#!/bin/sh\necho "docker-compose $*"\n')
        compose.chmod(0o755)
    # the only other program the script runs; the machine's own Compose stays out of sight
    (bin_dir / "dirname").symlink_to(shutil.which("dirname") or "/usr/bin/dirname")
    return bin_dir


@pytest.mark.parametrize("plugin, standalone, expected", [
    (True, True, "docker compose --profile simulator up"),
    (False, True, "docker-compose --profile simulator up"),
])
def test_compose_script_uses_whichever_compose_is_installed(tmp_path: Path, plugin: bool, standalone: bool,
                                                            expected: str) -> None:
    path = str(fake_bin(tmp_path, plugin=plugin, standalone=standalone))
    done = subprocess.run([BASH, str(ROOT / "scripts" / "compose"), "--profile", "simulator", "up"],
                          env={**os.environ, "PATH": path}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected


def test_compose_script_says_what_to_install_when_neither_is_there(tmp_path: Path) -> None:
    path = str(fake_bin(tmp_path, plugin=False, standalone=False))
    done = subprocess.run([BASH, str(ROOT / "scripts" / "compose"), "up"],
                          env={**os.environ, "PATH": path}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 127
    assert "neither 'docker compose' nor 'docker-compose' is installed" in done.stderr and done.stdout == ""


def test_package_metadata_uses_the_spdx_license_string_with_a_setuptools_that_reads_it() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # a TOML table here is what printed setuptools' deprecation banner on every install
    assert meta["project"]["license"] == "MIT"
    requires = meta["build-system"]["requires"]
    (setuptools,) = [r for r in requires if r.startswith("setuptools")]
    match = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools)
    assert match and int(match.group(1)) >= 77, setuptools  # PEP 639 license strings: setuptools 77
    assert not any(c.startswith("License ::") for c in meta["project"].get("classifiers", []))


def test_a_tick_after_the_scheduler_closed_publishes_nothing_and_raises_nothing() -> None:
    """A stop signal can close beat's scheduler (lock released, set to None) between two ticks."""
    from producer.scripting.scheduler import Scheduler

    closed = object.__new__(Scheduler)
    closed.lock_key = "echoq:redbeat::lock"
    closed.lock = None
    closed.max_interval = 1.0
    assert closed.tick() == 1.0
