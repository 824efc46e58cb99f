#!/usr/bin/env bash
# Create .venv at the repository root and install the project with its dev extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision are pinned exactly in pyproject.toml: they install from this machine's disk.
.venv/bin/python -m pip install -q -e '.[dev]'
# Debian's docker-compose validates docker-compose.yml without a Docker engine (tests/test_deploy.py).
if ! command -v docker-compose >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose) >/dev/null 2>&1 \
    || echo "could not install docker-compose; the compose validation test will be skipped"
fi
