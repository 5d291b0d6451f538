#!/usr/bin/env bash
# The speed benchmark on a CUDA machine, after a check that training runs there (two tiny bundle runs):
# bfloat16 autocast, cuCIM reading on every core, K = 4 and 8, on a 100000 x 100000 synthetic slide (written
# once into $BENCH_WORK, by every core); prints the same table as on CPU, writes $BENCH_WORK/speed.json, and
# probes cuCIM's GPU (nvJPEG) decoding of the same kind of reads.
#   bash scripts/bench_gpu.sh [extra `smt-monai benchmark speed` options]
# Needs the project's dependencies: `pip install -e .`, or, on a machine without internet whose Python has
# torch, the archive for that Python's version that scripts/fetch_gpu_wheels.sh packs into .gpu/ (unpacked
# here). Each package is imported alone first, under a time limit, so a stalled import is named instead of
# eating the run. Then copy the figures into docs/benchmarks.md with the card's name (speed.json holds it
# under environment.gpu).
# BENCH_DEVICE (default cuda) and BENCH_SIZE (default 100000) let the script be tried on a CPU;
# BENCH_IMPORT_TIMEOUT (default 120) is the seconds each import may take.
set -euo pipefail
cd "$(dirname "$0")/.."
device="${BENCH_DEVICE:-cuda}"
size="${BENCH_SIZE:-100000}"
work="${BENCH_WORK:-runs/bench_gpu}"
mkdir -p "$work"
limit="${BENCH_IMPORT_TIMEOUT:-120}"
# The first Python that has torch: images often keep it in a virtual environment that is not on PATH.
py=""
for candidate in python3 python /opt/torch/.venv/bin/python3; do
    if command -v "$candidate" > /dev/null \
        && timeout "$limit" "$candidate" -c "import torch" 2> /dev/null; then
        py="$(command -v "$candidate")"
        break
    fi
done
if [ -z "$py" ]; then
    echo "no Python with torch found (tried python3, python, /opt/torch/.venv/bin/python3)"
    exit 1
fi
echo "python: $py"
archive=".gpu/site-py$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])').tar.xz"
if [ -f "$archive" ]; then
    site="${TMPDIR:-/tmp}/smt_gpu_site"
    rm -rf "$site" && mkdir -p "$site" && tar -C "$site" -xJf "$archive"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "packages from $archive unpacked into $site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
for module in numpy torch tifffile imagecodecs cucim monai ignite nibabel smt_monai; do
    began=$(date +%s%N)
    if ! timeout "$limit" "$py" -X importtime -c "import $module" 2> "$work/import_$module.log"; then
        echo "import $module failed or did not return within $limit s; the last modules it imported" \
            "($work/import_$module.log):"
        tail -n 5 "$work/import_$module.log"
        exit 1
    fi
    echo "import $module: $(( ($(date +%s%N) - began) / 1000000 )) ms"
done
# Importing imagecodecs loads no codec; the synthetic slide's writer needs its JPEG codec, so encode one
# tile with the writer's own encoder here.
if ! "$py" -c "import numpy; from smt_monai.data.synth.pyramid import encode_tile
encode_tile(numpy.zeros((16, 16, 3), numpy.uint8), 90)" 2> "$work/jpeg.log"; then
    echo "imagecodecs cannot encode JPEG ($work/jpeg.log): $(tail -n 1 "$work/jpeg.log")"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$py" - <<'PY'
import cucim
import torch

print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(no GPU)", "cucim", cucim.__version__)
PY
# Training on the device, which the CPU tests cannot reach: two bundle runs (paper.yaml and the default) of
# two epochs with every layer on a tiny cohort, through the ablation's own runs.
check="$work/train_check"
rm -rf "$check"
began=$(date +%s)
if ! { "$py" -m smt_monai synth --out "$check/cohort" --num-slides 10 --seed 11 --mpp 0.5 --tissue-mm 2,3 \
        --workers "$(nproc)" --quiet \
    && "$py" -m smt_monai benchmark ablation --work-dir "$check" --json "$check/ablation.json" \
        --dataset-dir "$check/cohort" --smt-config cpu.yaml --focus 4 --ks --seeds 0 \
        --variants "paper: forward + backward" default --smt "device=\$torch.device('$device')" \
        --smt max_epochs=2 --smt "start_epoch=[1,1,1]" --smt val_interval=1; } > "$check.log" 2>&1; then
    echo "training on $device failed ($check.log):"
    grep -v '^\s*[~^]*$' "$check.log" | tail -n 12
    exit 1
fi
echo "training on $("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["environment"]["device"])' \
    "$check/ablation.json"): 2 runs of 2 epochs, every layer, in $(( $(date +%s) - began )) s"
start=$(date +%s)
[ -f "$work/slide_$size/cohort.json" ] || "$py" -m smt_monai synth --out "$work/slide_$size" --num-slides 1 \
    --size "$size" --seed 0 --positive-fraction 1 --workers 1
echo "slide written in $(( $(date +%s) - start )) s"
"$py" -m smt_monai benchmark speed --device "$device" --amp --backend cucim --num-workers "$(nproc)" \
    --size "$size" --sizes "$size" --focus 4 8 --work-dir "$work" --json "$work/speed.json" "$@"
"$py" - "$work/speed.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"{s['environment'].get('gpu', s['environment']['cpu'])}: slide {s['slide_width']} px")
for k in (4, 8):
    print(f"  SMT K={k}: {s[f'smt_seconds_k{k}']:.3f} s/slide (I/O floor {s[f'floor_seconds_k{k}']:.3f} s, "
          f"SMT/floor {s[f'smt_over_floor_k{k}']:.2f}, dense/SMT {s[f'dense_over_smt_k{k}']:.0f}; network "
          f"{s[f'smt_compute_seconds_k{k}']:.3f} s, waiting for reads {s[f'smt_read_wait_seconds_k{k}']:.3f} s)")
print(f"  dense: {s['dense_seconds']:.1f} s/slide ({s['dense_tiles_total']} tiles)")
PY
# The probe reads regions as big as the last layer's (the tissue box's side / grid^2, at level 0).
grid="$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["grid"])' "$work/speed.json")"
"$py" scripts/probe_gpu_decode.py "$work/slide_$size/images/slide_000.tiff" --grid "$grid" \
    || echo "GPU decoding probe failed (above)"
