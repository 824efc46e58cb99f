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
# Debian packages the tests use: docker-compose validates docker-compose.yml without a Docker engine
# (tests/test_deploy.py); chromium renders the dashboard headless (tests/service/test_dashboard.py).
missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing ${missing[*]} (Debian)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null 2>&1 \
    || echo "could not install ${missing[*]}; the tests that need them will be skipped"
fi
