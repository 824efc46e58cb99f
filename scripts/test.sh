#!/usr/bin/env bash
# The whole test suite, from a fresh machine: set up .venv, lint, type-check, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
.venv/bin/ruff check itrd service worker tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
