#!/usr/bin/env bash
# Quick start: set up .venv, make a small synthetic cohort, train SMT briefly, evaluate it, and run
# inference on the cohort's test split. Prints where the results are. DEMO_DIR changes where they go.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
OUT="${DEMO_DIR:-$ROOT/demo_output}"
DATA="$OUT/cohort"
# A CPU-sized SMT: the tiny preset (width 64, depth 2) on layer inputs of 4 x 4 patches of 64 px, read at
# the stem's pooled side (128 px).
GEOMETRY=(--preset tiny --grid 4 --patch_size 64 --num_focus 4)

if [ ! -f "$DATA/datalist.json" ]; then
  smt-monai synth --out "$DATA" --num-slides 12 --size 8192 --seed 7
fi
first="$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['testing'][0]['image'])" "$DATA/datalist.json")"
echo
smt-monai info "$DATA/$first"

echo
echo "== training (a few epochs; see bundle/docs/README.md for a full run) =="
python -m monai.bundle run training --config_file bundle/configs/train.yaml \
  --dataset_dir "$DATA" --output_dir "$OUT/model" "${GEOMETRY[@]}" \
  --max_epochs "${DEMO_EPOCHS:-8}" --start_epoch "[1,2,3]" --ramp_epochs 2 --batch_size 2

echo
echo "== evaluation on the testing split =="
python -m monai.bundle run evaluating \
  --config_file "['bundle/configs/train.yaml','bundle/configs/evaluate.yaml']" \
  --datalist "$DATA/datalist.json" --ckpt_path "$OUT/model/model.pt" --output_dir "$OUT/eval" "${GEOMETRY[@]}"

echo
echo "== inference on the testing split =="
python -m monai.bundle run inference --config_file bundle/configs/inference.yaml \
  --datalist "$DATA/datalist.json" --ckpt_path "$OUT/model/model.pt" --output_dir "$OUT/predictions" \
  "${GEOMETRY[@]}"

overlay="$(ls "$OUT"/predictions/*/overlay.png | head -n 1)"
echo
echo "Synthetic cohort:  $DATA/datalist.json"
echo "Trained model:     $OUT/model/model.pt (TensorBoard: tensorboard --logdir $OUT/model)"
echo "Metrics:           $OUT/eval/metrics.json"
echo "Predictions:       $OUT/predictions/predictions.csv"
echo "Focus overlay:     $overlay"
