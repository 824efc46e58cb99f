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
