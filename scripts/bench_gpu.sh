#!/usr/bin/env bash
# The speed benchmark on a CUDA machine: bfloat16 autocast, cuCIM reading on every core, K = 4 and 8, on a
# 100000 x 100000 synthetic slide (written once into $BENCH_WORK, by every core); prints the same table as
# on CPU, writes $BENCH_WORK/speed.json, and probes cuCIM's GPU (nvJPEG) decoding of the same kind of reads.
#   bash scripts/bench_gpu.sh [extra `smt-monai benchmark speed` options]
# Needs the project's dependencies (`pip install -e .`, or wheels in ./wheels: scripts/fetch_gpu_wheels.sh,
# installed here with --no-index). Then copy the figures into docs/benchmarks.md with the card's name
# (the JSON holds it under environment.gpu).
# BENCH_DEVICE (default cuda) and BENCH_SIZE (default 100000) let the script be tried on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d wheels ] && ls wheels/*.whl > /dev/null 2>&1; then
    # --no-deps: their other dependencies (numpy, scipy, scikit-image, cupy) are on the machine already
    python -m pip install --no-index --no-deps wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
device="${BENCH_DEVICE:-cuda}"
size="${BENCH_SIZE:-100000}"
work="${BENCH_WORK:-runs/bench_gpu}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(no GPU)")
try:
    import cucim
    print("cucim", cucim.__version__)
except ImportError as exc:
    print("cucim missing:", exc)
PY
start=$(date +%s)
[ -f "$work/slide_$size/cohort.json" ] || python -m smt_monai synth --out "$work/slide_$size" --num-slides 1 \
    --size "$size" --seed 0 --positive-fraction 1 --workers 1
echo "slide written in $(( $(date +%s) - start )) s"
python -m smt_monai benchmark speed --device "$device" --amp --backend cucim --num-workers "$(nproc)" \
    --size "$size" --sizes "$size" --focus 4 8 --work-dir "$work" --json "$work/speed.json" "$@"
python - "$work/speed.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"{s['environment'].get('gpu', s['environment']['cpu'])}: slide {s['slide_width']} px")
for k in (4, 8):
    print(f"  SMT K={k}: {s[f'smt_seconds_k{k}']:.3f} s/slide (I/O floor {s[f'floor_seconds_k{k}']:.3f} s, "
          f"SMT/floor {s[f'smt_over_floor_k{k}']:.2f}, dense/SMT {s[f'dense_over_smt_k{k}']:.0f}; network "
          f"{s[f'smt_compute_seconds_k{k}']:.3f} s, waiting for reads {s[f'smt_read_wait_seconds_k{k}']:.3f} s)")
print(f"  dense: {s['dense_seconds']:.1f} s/slide ({s['dense_tiles_total']} tiles)")
PY
python scripts/probe_gpu_decode.py "$work/slide_$size/images/slide_000.tiff" --side "$(python - "$work/speed.json" <<'PY'
import json, sys
print(json.load(open(sys.argv[1]))["input_side"])
PY
)" || echo "GPU decoding probe failed (above)"
