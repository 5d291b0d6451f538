#!/usr/bin/env bash
# Quick start: set up .venv, make a small synthetic cohort, and show what smt-monai reads from a slide.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
OUT="${DEMO_DIR:-$ROOT/demo_output}"
DATA="$OUT/cohort"
if [ ! -f "$DATA/datalist.json" ]; then
  smt-monai synth --out "$DATA" --num-slides 8 --size 8192 --seed 7
fi
first="$(python -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['testing'][0]['image'])" "$DATA/datalist.json")"
echo
smt-monai info "$DATA/$first"
echo
echo "Synthetic cohort: $DATA (datalist: $DATA/datalist.json)"
