#!/usr/bin/env bash
# Set up .venv and run the whole test suite (slow end-to-end tests included); then the MONAI Deploy app's
# tests in .venv-deploy, the environment that has the App SDK (see setup_env.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
(
  source "$ROOT/scripts/setup_env.sh"
  ruff check smt_monai scripts tests
  python -m pytest -q -ra --ignore=tests/test_deploy.py "$@"
)
(
  SMT_VENV="$ROOT/.venv-deploy" SMT_EXTRAS="dev,deploy" source "$ROOT/scripts/setup_env.sh"
  python -m pytest -q -ra tests/test_deploy.py
)
