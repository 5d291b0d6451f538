#!/usr/bin/env bash
# Quick start: set up .venv; predict fresh synthetic slides with the model the bundle ships (seconds); then
# make a small synthetic cohort, train a CPU-sized SMT on it, evaluate and predict with it. Prints where the
# results are. DEMO_DIR changes where they go, DEMO_EPOCHS how long the demo trains.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
OUT="${DEMO_DIR:-$ROOT/demo_output}"
MODEL="$ROOT/bundle/models/model.pt"
# the bundle runs below parse this project's own configs: MONAI's warning about untrusted configs is not news here
export PYTHONWARNINGS="ignore:parsing config_file:UserWarning"

echo "== 1. the model the bundle ships, on slides it has never seen =="
smt-monai model "$MODEL"
# 20x scans (0.5 um/px) of 2-4 mm specimens; the model was trained on 40x scans: it reads both at its own scale.
if [ ! -f "$OUT/slides/datalist.json" ]; then
  smt-monai synth --out "$OUT/slides" --num-slides 4 --seed 2026 --mpp 0.5 --tissue-mm 2,4 --split 0 0 1 --quiet
fi
smt-monai predict "$OUT/slides/datalist.json" --model "$MODEL" --output "$OUT/shipped" --quiet
python - "$OUT/shipped" <<'PY'
import csv, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = list(csv.DictReader(open(out / "predictions.csv")))
print(f"{'slide':<16}{'truth':>7}{'predicted':>11}{'P(tumour)':>11}{'seconds':>9}")
for r in rows:
    truth = {"0": "benign", "1": "tumour"}.get(r["label"], "?")
    print(f"{Path(r['image']).stem:<16}{truth:>7}{r['class']:>11}{float(r['prob_tumour']):>11.3f}{float(r['total_s']):>9.2f}")
positive = max((r for r in rows if r["label"] == "1"), key=lambda r: float(r["prob_tumour"]), default=None)
if positive is not None:
    folder = out / Path(positive["image"]).stem
    print(f"where it looked on a tumour slide: {folder / 'overlay.png'} and the cells it judged: {folder / 'gallery.jpg'}")
PY

echo
echo "== 2. train your own (a few epochs on a small cohort: a demonstration, not a benchmark) =="
DATA="$OUT/cohort"
if [ ! -f "$DATA/datalist.json" ]; then
  smt-monai synth --out "$DATA" --num-slides 12 --seed 7 --tissue-mm 2,3 --quiet
fi
CONFIGS="['bundle/configs/train.yaml','bundle/configs/cpu.yaml']"
python -m monai.bundle run training --config_file "$CONFIGS" --dataset_dir "$DATA" --output_dir "$OUT/model" \
  --max_epochs "${DEMO_EPOCHS:-8}" --start_epoch "[1,2,3]" --ramp_epochs 2 --val_interval 2 --batch_size 2

echo
echo "== evaluation on the testing split (its few slides say little about a model trained this briefly) =="
python -m monai.bundle run evaluating \
  --config_file "['bundle/configs/train.yaml','bundle/configs/evaluate.yaml']" \
  --datalist "$DATA/datalist.json" --ckpt_path "$OUT/model/model.pt" --output_dir "$OUT/eval"

echo
echo "== prediction with the model you trained (its settings come from its file) =="
smt-monai predict "$DATA/datalist.json" --model "$OUT/model/model.pt" --output "$OUT/predictions" --quiet

echo
echo "Shipped model's predictions: $OUT/shipped/predictions.csv"
echo "Synthetic cohort:            $DATA/datalist.json"
echo "Your model:                  $OUT/model/model.pt (TensorBoard: tensorboard --logdir $OUT/model)"
echo "Its metrics:                 $OUT/eval/metrics.json"
echo "Its predictions:             $OUT/predictions/predictions.csv (per slide: overlay.png, gallery.jpg,"
echo "                             focus.geojson for QuPath, focus_map.nii.gz)"
