#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set up .venv, then run pytest on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q --durations=10 tests "$@"
