#!/usr/bin/env bash
# Set up .venv and run the whole test suite (slow end-to-end tests included).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
ruff check smt_monai scripts tests
python -m pytest -q -ra "$@"
