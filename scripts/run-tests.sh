#!/usr/bin/env bash
# The test suite: set up .venv if needed, check lint and types, run pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PWD/.tools/node_modules/.bin:$PATH"
export TRAINER_HOME="${TRAINER_HOME:-$PWD/.cache/trainer-home}"
echo "== ruff" && ruff check src scripts tests
echo "== mypy" && mypy
echo "== pytest"
exec python -m pytest "$@"
