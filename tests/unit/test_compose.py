"""The deployment files: docker-compose.yml, Dockerfile, .env.example, and the commands they run.

The compose checks read ``docker compose config --format json`` when the Compose plugin is
installed (it validates and normalises the file), else the standalone ``docker-compose config``;
with neither they read the YAML directly, with the same interpolation rules for the ``${VAR}``
forms the file uses, so the structure is checked on every machine. No Docker engine is needed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

ECHOQ_SERVICES = ("worker", "beat", "flower", "api", "simulator")
ALL_SERVICES = ("redis", *ECHOQ_SERVICES)


# loading ---------------------------------------------------------------------------------------


def _compose_cli() -> tuple[list[str], bool] | None:
    """The Compose command and whether it prints JSON: the ``docker compose`` plugin, else the
    older standalone ``docker-compose`` (YAML output), else None."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return [docker, "compose"], True
    standalone = shutil.which("docker-compose")
    return ([standalone], False) if standalone else None


_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def _interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``${VAR:?err}`` forms."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group("name"), m.group("op"), m.group("arg") or ""
        current = env.get(name)
        missing = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-"):
            return arg if missing else str(current)
        if op in (":?", "?"):
            if missing:
                raise ValueError(f"required variable {name} is missing: {arg}")
            return str(current)
        return "" if current is None else current

    return _VAR.sub(sub, value).replace("$$", "$")


def _load_compose_file() -> dict[str, Any]:
    """The file as Compose would read it, without the Compose plugin: merge keys resolved by
    YAML, variables interpolated, extension fields dropped."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    raw = {k: v for k, v in raw.items() if not k.startswith("x-")}
    data: dict[str, Any] = _interpolate(raw, os.environ)
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    found = _compose_cli()
    if found is None:
        return _load_compose_file()
    cli, prints_json = found
    fmt = ["--format", "json"] if prints_json else []
    proc = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "--profile", "simulator", "config", *fmt],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{shlex.join(cli)} config failed:\n{proc.stderr}"
    data: dict[str, Any] = json.loads(proc.stdout) if prints_json else yaml.safe_load(proc.stdout)
    return data


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    assert cmd, "service has no command"
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _environment(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = [item.partition("=") for item in env]
        return {k: (v if sep else None) for k, sep, v in pairs}
    return {str(k): (None if v is None else str(v)) for k, v in env.items()}


def _seconds(value: Any) -> float:
    """A Compose duration (``30s``, ``1m30s``) or nanoseconds (normalised JSON) in seconds."""
    if isinstance(value, int | float):
        return float(value) / 1e9 if value > 10_000 else float(value)
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", str(value)):
        total += float(amount) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}[unit]
    return total


# compose ---------------------------------------------------------------------------------------


def test_docker_compose_validates_the_file() -> None:
    """A real Compose parser accepts the file. ``scripts/setup.sh --test`` installs one (Debian's
    docker-compose) where the docker compose plugin is missing, so under CI its absence fails."""
    found = _compose_cli()
    if found is None:
        message = "no docker compose here (plugin or standalone); scripts/setup.sh --test installs docker-compose"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    cli, _ = found
    proc = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "--profile", "simulator", "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_every_service_is_there(compose: dict[str, Any]) -> None:
    assert set(ALL_SERVICES) <= set(_services(compose))


def test_redis_persists_and_never_evicts(compose: dict[str, Any]) -> None:
    redis = _services(compose)["redis"]
    assert redis["image"].startswith("redis:7")
    cmd = _command(redis)
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"

    test = redis["healthcheck"]["test"]
    test = shlex.split(test) if isinstance(test, str) else test
    assert "redis-cli" in test and "ping" in test

    volumes = redis.get("volumes") or []
    targets = [v["target"] if isinstance(v, dict) else v.split(":")[1] for v in volumes]
    assert "/data" in targets
    assert "redis-data" in (compose.get("volumes") or {})


@pytest.mark.parametrize("name", ECHOQ_SERVICES)
def test_echoq_service_shape(compose: dict[str, Any], name: str) -> None:
    service = _services(compose)[name]
    assert "build" in service, "echoq services are built from the Dockerfile"
    depends = service["depends_on"]
    assert isinstance(depends, dict) and depends["redis"]["condition"] == "service_healthy"
    assert _environment(service)["ECHOQ_REDIS_URL"] == "redis://redis:6379/0"
    assert service["restart"] == "unless-stopped"
    assert _seconds(service["stop_grace_period"]) >= 10


def test_worker_is_scalable_and_stops_warm(compose: dict[str, Any]) -> None:
    worker = _services(compose)["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports"), "a fixed host port would stop --scale worker=N"
    assert worker["stop_signal"] == "SIGTERM"
    assert _seconds(worker["stop_grace_period"]) >= 30


def test_worker_metrics_reachable_inside_the_network(compose: dict[str, Any]) -> None:
    env = _environment(_services(compose)["worker"])
    assert int(env["ECHOQ_METRICS_PORT"] or 0) > 0
    assert env["ECHOQ_METRICS_HOST"] == "0.0.0.0"


def test_simulator_only_in_its_profile(compose: dict[str, Any]) -> None:
    services = _services(compose)
    assert services["simulator"]["profiles"] == ["simulator"]
    for name in ALL_SERVICES:
        if name != "simulator":
            assert not services[name].get("profiles"), f"{name} must start without a profile"


def test_flower_credentials_come_from_the_environment(compose: dict[str, Any]) -> None:
    flower = _services(compose)["flower"]
    # Read from the file itself: an unset pass-through variable may be dropped from the
    # normalised output.
    assert "FLOWER_BASIC_AUTH" in _environment(_load_compose_file()["services"]["flower"])
    cmd = _command(flower)
    assert "--no-auth" not in cmd
    assert not any("basic" in part.lower() for part in cmd), "credentials never go on a command line"


# the commands the services run -----------------------------------------------------------------


def _echoq() -> list[str]:
    """The ``echoq`` console script of this interpreter, or its module when not installed."""
    script = shutil.which("echoq", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "producer.cli"]


def _run_echoq(args: list[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_echoq(), *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(env or os.environ)
    )


def _entrypoint() -> list[str]:
    for instruction, arg in _dockerfile_instructions():
        if instruction == "ENTRYPOINT":
            parsed = json.loads(arg) if arg.startswith("[") else shlex.split(arg)
            return [str(p) for p in parsed]
    return []


@pytest.mark.parametrize("name", ECHOQ_SERVICES)
def test_service_command_exists_in_the_image(compose: dict[str, Any], name: str) -> None:
    """Each service runs ``echoq <sub> <options>``: the same line with --help must succeed."""
    full = _entrypoint() + _command(_services(compose)[name])
    assert full[0] == "echoq", f"{name}: {full} does not run the echoq console script"
    proc = _run_echoq([*full[1:], "--help"])
    assert proc.returncode == 0, f"`{shlex.join(full)} --help` failed:\n{proc.stderr}"
    assert "usage:" in proc.stdout


def test_console_script_is_what_the_image_installs() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["echoq"] == "producer.cli:main"


# echoq flower: authentication ------------------------------------------------------------------


def _env_without_flower_auth() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}


def test_flower_refuses_to_start_without_credentials() -> None:
    proc = _run_echoq(["flower"], env=_env_without_flower_auth())
    assert proc.returncode == 2
    assert "FLOWER_BASIC_AUTH" in proc.stderr and "--no-auth" in proc.stderr


def test_flower_never_prints_malformed_credentials() -> None:
    env = _env_without_flower_auth() | {"FLOWER_BASIC_AUTH": "only-a-secret-no-colon"}
    proc = _run_echoq(["flower"], env=env)
    assert proc.returncode == 2
    assert "only-a-secret-no-colon" not in proc.stderr + proc.stdout


def test_flower_no_auth_only_on_loopback() -> None:
    proc = _run_echoq(["flower", "--no-auth", "--address", "0.0.0.0"], env=_env_without_flower_auth())
    assert proc.returncode == 2
    assert "0.0.0.0" in proc.stderr


def test_flower_command_line_keeps_credentials_in_the_environment() -> None:
    import argparse

    from producer.cli import ops as cli_ops

    parser = argparse.ArgumentParser()
    cli_ops.register(parser.add_subparsers())
    args = parser.parse_args(["flower", "--address", "0.0.0.0", "--port", "5556"])

    env, problem = cli_ops.flower_env(args, {"FLOWER_BASIC_AUTH": "ops:s3cret,viewer:pw"})
    assert problem is None and env is not None and env["FLOWER_BASIC_AUTH"] == "ops:s3cret,viewer:pw"
    argv = cli_ops.flower_argv(args, "redis://redis:6379/0")
    assert argv[:3] == [sys.executable, "-m", "celery"]
    assert argv[argv.index("--broker") + 1] == "redis://redis:6379/0"
    assert argv[argv.index("--broker") + 2 :] == ["flower", "--port=5556", "--address=0.0.0.0"]
    assert not any("s3cret" in part for part in argv)

    local = parser.parse_args(["flower", "--no-auth"])
    env, problem = cli_ops.flower_env(local, {"FLOWER_BASIC_AUTH": "ops:s3cret"})
    assert problem is None and env is not None and "FLOWER_BASIC_AUTH" not in env


# Dockerfile ------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        instruction, _, arg = full.partition(" ")
        out.append((instruction.upper(), arg.strip()))
    return out


def test_dockerfile_base_ffmpeg_project_and_user() -> None:
    instructions = _dockerfile_instructions()
    froms = [arg for ins, arg in instructions if ins == "FROM"]
    assert froms and froms[-1].split()[0] == "python:3.11-slim"

    runs = [arg for ins, arg in instructions if ins == "RUN"]
    assert any("apt-get install" in r and re.search(r"\bffmpeg\b", r) for r in runs), "ffmpeg is installed"
    assert any(re.search(r"\bpip install\b.*\[api\]", r) for r in runs), (
        "the project is installed with the api extra"
    )
    assert any(ins in ("COPY", "ADD") for ins, _ in instructions), "the project source is copied in"

    users = [arg for ins, arg in instructions if ins == "USER"]
    assert users and users[-1] not in ("root", "0"), "services run as a non-root user"


def test_dockerignore_keeps_the_context_clean() -> None:
    lines = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".git", ".venv", ".env", "out", "**/__pycache__", ".pytest_cache", ".mypy_cache"):
        assert entry in lines, f".dockerignore misses {entry}"


# .env.example ----------------------------------------------------------------------------------


def _env_example_keys() -> dict[str, str | None]:
    """Key -> value for ``KEY=value`` lines; None for documented but commented-out ``# KEY=``."""
    out: dict[str, str | None] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if m:
            out[m.group(2)] = None if m.group(1) else m.group(3)
    return out


def _env_name(field: str) -> str:
    return "TAVUS_API_KEY" if field == "tavus_api_key" else f"ECHOQ_{field.upper()}"


def test_env_example_lists_every_setting() -> None:
    from worker.settings import Settings

    keys = _env_example_keys()
    missing = [_env_name(f) for f in Settings.model_fields if _env_name(f) not in keys]
    assert not missing, f".env.example misses {missing}"
    assert "FLOWER_BASIC_AUTH" in keys


def test_env_example_holds_no_secrets() -> None:
    keys = _env_example_keys()
    for name in ("TAVUS_API_KEY", "FLOWER_BASIC_AUTH", "ECHOQ_API_TOKENS"):
        assert not keys.get(name), f"{name} must be empty in .env.example"


def test_env_example_values_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.settings import Settings

    for name in list(os.environ):
        if name.startswith("ECHOQ_") or name == "TAVUS_API_KEY":
            monkeypatch.delenv(name)
    from_file = Settings(_env_file=ENV_EXAMPLE)  # type: ignore[call-arg]
    for field, info in Settings.model_fields.items():
        if field == "tavus_api_key":
            continue
        assert getattr(from_file, field) == info.default, f"{_env_name(field)} differs from its default"


def test_beat_refuses_a_lock_that_could_lapse_between_two_ticks() -> None:
    from producer.cli.ops import beat_timing
    from worker.settings import Settings

    defaults = Settings()
    assert beat_timing(defaults.beat_max_interval_s, defaults.beat_lock_timeout_s) is None
    assert defaults.beat_lock_timeout_s + defaults.beat_max_interval_s <= 10  # failover in seconds
    problem = beat_timing(3, 5)
    assert problem is not None and "twice" in problem
