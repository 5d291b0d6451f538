#!/usr/bin/env bash
# Create a virtual environment (if missing) and install smt-monai with its dependencies into it.
# Sourced by demo.sh and test.sh; safe to run again (it only installs what is missing).
#   SMT_VENV    the environment's folder (default: .venv)
#   SMT_EXTRAS  extras to install (default: dev); test.sh builds .venv-deploy with "dev,deploy", because the
#               MONAI Deploy App SDK installs into the `monai` package and brings a CUDA 13 CuPy that clashes
#               with cuCIM's CUDA 12 one: it lives in an environment of its own, as in its container.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SMT_VENV:-$ROOT/.venv}"
EXTRAS="${SMT_EXTRAS:-dev}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch (CPU wheel)"
  "$VENV/bin/pip" install -q "torch==2.13.0" || "$VENV/bin/pip" install -q torch
fi
stamp="$VENV/.smt_monai_installed_${EXTRAS//,/_}"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "[setup] installing smt-monai[$EXTRAS] and its dependencies into $VENV (first run downloads cuCIM, ~3 GB)"
  "$VENV/bin/pip" install -q -e "$ROOT[$EXTRAS]"
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
