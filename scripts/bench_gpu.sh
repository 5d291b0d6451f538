#!/usr/bin/env bash
# The speed benchmark on a CUDA machine: cuCIM (GPU decoding where it can), bfloat16 autocast, K = 4 and 8,
# on a 100000 x 100000 synthetic slide; prints the same table as on CPU and writes runs/bench_gpu/speed.json.
#   bash scripts/bench_gpu.sh [extra `smt-monai benchmark speed` options]
# Writing the 100000 px slide takes minutes (one process); it is cached in $BENCH_WORK for reruns.
# Offline: wheels in ./wheels (scripts/fetch_gpu_wheels.sh) are installed with --no-index when present.
# Then `smt-monai benchmark report --speed-json runs/bench_gpu/speed.json --out docs/benchmarks_gpu.md`, or
# copy the figures into docs/benchmarks.md with the card's name (the JSON holds it under environment.gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d wheels ] && ls wheels/*.whl > /dev/null 2>&1; then
    # --no-deps: their other dependencies (numpy, scipy, scikit-image, cupy) are on the machine already
    python -m pip install --no-index --no-deps wheels/*.whl
fi
python -m pip install --no-deps --no-build-isolation -e . > /dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
try:
    import cucim
    print("cucim", cucim.__version__)
except ImportError as exc:
    print("cucim missing:", exc)
PY
work="${BENCH_WORK:-runs/bench_gpu}"
smt-monai benchmark speed --device cuda --amp --backend cucim --num-workers "$(nproc)" \
    --size 100000 --sizes 100000 --focus 4 8 --work-dir "$work" --json "$work/speed.json" "$@"
python - "$work/speed.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"{s['environment'].get('gpu')}: slide {s['slide_width']} px")
for k in (4, 8):
    print(f"  SMT K={k}: {s[f'smt_seconds_k{k}']:.3f} s/slide (I/O floor {s[f'floor_seconds_k{k}']:.3f} s, "
          f"SMT/floor {s[f'smt_over_floor_k{k}']:.2f}, dense/SMT {s[f'dense_over_smt_k{k}']:.0f})")
print(f"  dense: {s['dense_seconds']:.1f} s/slide ({s['dense_tiles_total']} tiles)")
PY
