#!/usr/bin/env bash
# Create .venv (if missing) and install dvla into it; idempotent and quiet when up to date.
#
# Torch: when the venv has no torch yet, install DVLA_TORCH_SPEC (default torch==2.13.0, which
# pip takes from this machine's local CPU wheel; an unpinned "torch" would pull a multi-GB CUDA
# build). Set DVLA_TORCH_SPEC to e.g. "torch==2.14.1" or a wheel path to override.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${DVLA_VENV:-.venv}"
PY="${DVLA_PYTHON:-python3}"
stamp="$VENV/.dvla-installed"

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  spec="${DVLA_TORCH_SPEC:-torch==2.13.0}"
  echo "bootstrap: installing $spec"
  "$VENV/bin/python" -m pip install --quiet "$spec"
fi
# Extras to install (DVLA_EXTRAS, default "dev"; CI adds "ray" for the Ray launcher test).
extras="${DVLA_EXTRAS:-dev}"
# Reinstall only when the packaging metadata or the extras changed since the last install.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$extras" ]; then
  echo "bootstrap: installing dvla (editable, extras: $extras)"
  "$VENV/bin/python" -m pip install --quiet -e ".[$extras]"
  echo "$extras" > "$stamp"
fi
