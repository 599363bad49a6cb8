#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent and quick when
# nothing changed). Needs only python3 (>= 3.11) with pip and venv.
#
#   TORCH_SPEC   torch requirement installed first (default: torch==2.13.0, the CPU build
#                on this kind of machine). On a GPU box, e.g. TORCH_SPEC="torch>=2.4".
#   VENV         where the environment lives (default: .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.bootstrap-stamp"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
echo "bootstrap: installing $TORCH_SPEC" >&2
pip install "$TORCH_SPEC"
echo "bootstrap: installing the project with its server, demo and dev extras" >&2
pip install -e ".[server,demo,dev]"
# buf (for the lint test) comes from npm when npm is there; tests skip it otherwise.
if command -v npm >/dev/null 2>&1 && [ ! -x .tools/node_modules/.bin/buf ]; then
  echo "bootstrap: installing buf from npm into .tools" >&2
  npm install --silent --no-fund --no-audit --prefix .tools @bufbuild/buf@1.75.0 >/dev/null 2>&1 \
    || echo "bootstrap: buf install failed; the buf lint test will be skipped" >&2
fi
echo "$want" > "$stamp"
