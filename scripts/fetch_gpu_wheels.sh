#!/usr/bin/env bash
# Download, on a machine with internet, the wheels that scripts/bench_gpu.sh installs offline on the GPU
# machine (Python 3.12, torch and cupy-cuda13x already there, no internet) into ./wheels (git-ignored).
#   bash scripts/fetch_gpu_wheels.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-wheels}"
mkdir -p "$dest"
python -m pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    --no-deps -d "$dest" \
    "cucim-cu13==26.10.0" nvidia-nvimgcodec-cu13 "monai==1.6.1" "pytorch-ignite==0.5.5" einops nibabel \
    imagecodecs
ls -la "$dest"
