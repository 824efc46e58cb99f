#!/usr/bin/env bash
# The product's main job on embedded defaults, from a fresh machine: set up .venv, then start the API
# and a worker (SQLite, file broker, local artifacts), train a teacher, distill a student with ITRD,
# download it and print both accuracies.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/itrd demo "$@"
