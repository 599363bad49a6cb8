#!/usr/bin/env bash
# The main job: set up .venv if needed, start a server on the built-in tiny model inside the
# demo process, and train it with a custom loss through forward_backward_custom.
# Extra arguments go to scripts/demo.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python scripts/demo.py "$@"
