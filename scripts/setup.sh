#!/usr/bin/env bash
# Sets up what echoq needs on a fresh Debian machine, idempotently:
#   system packages (ffmpeg, redis-server; with --test also docker-compose and chromium),
#   a Redis on 127.0.0.1:6379 when none answers, and the virtual environment in .venv.
# Source it or run it; it only installs what is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

missing=()
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if ((want_test)); then
  command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
fi
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  sudo=""
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  say "starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile "$(mktemp -t echoq-redis.XXXXXX.log)"
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.echoq-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  say "installing echoq and its dependencies into .venv"
  # pip's own output is kept in a log and shown only when something fails
  log=$(mktemp -t echoq-setup.XXXXXX.log)
  if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e ".[api,dev]" \
         && .venv/bin/python -c "import worker, producer, celery, daily, soxr, fastapi, fastapi_offline"; } >"$log" 2>&1; then
    echo "installing into .venv failed; the end of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
  rm -f "$log"
  touch "$stamp"
fi
