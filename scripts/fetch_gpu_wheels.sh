#!/usr/bin/env bash
# Pack, on a machine with internet, the Python packages that scripts/bench_gpu.sh needs on an offline CUDA
# machine whose Python already holds torch (CUDA 13), CuPy and SciPy: cuCIM (CUDA 13) with nvImageCodec and
# the nvJPEG, nvJPEG 2000 and nvTIFF libraries it decodes with on the GPU, MONAI, Ignite, nibabel, what the
# bundle's training runs import (PyYAML, psutil, tqdm, TensorBoard's writer, matplotlib), and numpy,
# imagecodecs and tifffile at this Python's versions, so that `smt-monai synth` draws there the slides it
# draws here (on an H200 machine a 120-slide cohort came out byte for byte the same; a 60-slide one differed
# in some files, cause not found); unpacked and trimmed to what this project uses, in one archive that
# bench_gpu.sh unpacks. The archive comes to about 50 MB, so it can travel with a working
# tree that is capped at 64 MiB.
#   bash scripts/fetch_gpu_wheels.sh [PYTHON_VERSION (default 3.12)]    # writes .gpu/site-pyVERSION.tar.xz
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.12}"
archive=".gpu/site-py$version.tar.xz"
tag="${version/./}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The slide writer's packages at the versions here (the latest where one is missing).
pinned=()
for package in numpy imagecodecs tifffile; do
    pinned+=("$package$(python3 -c "import $package; print('==' + $package.__version__)" 2> /dev/null || true)")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$work/wheels" \
    "cucim-cu13==26.10.0" nvidia-nvimgcodec-cu13 \
    "nvidia-nvjpeg>=13,<14" nvidia-nvjpeg2k-cu13 nvidia-nvtiff-cu13 \
    "monai==1.6.1" "pytorch-ignite==0.5.5" nibabel pyyaml psutil tqdm einops tensorboard protobuf absl-py \
    matplotlib cycler kiwisolver pyparsing python-dateutil six fonttools pillow contourpy packaging \
    "${pinned[@]}"
site="$work/site"
for wheel in "$work"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$site"; done
# nvImageCodec ships its binding for every Python and an OpenCV extension cuCIM does not load.
find "$site/nvidia/nvimgcodec" -name 'nvimgcodec_impl.cpython-*' ! -name "nvimgcodec_impl.cpython-$tag-*" \
    -delete
rm -rf "$site"/nvidia/nvimgcodec/extensions/libopencv_ext* "$site"/nvidia/nvimgcodec/tools \
    "$site"/nvidia/*/include
# imagecodecs: tifffile needs its JPEG (slide tiles) and zlib (deflate) codecs, the latter linked to the
# system's libz; imagecodecs loads each codec module on first use, so the others can go. The JPEG module is
# _jpeg8 in older releases and _jpeg from 2026 on.
find "$site/imagecodecs" -maxdepth 1 -name '_*.so' ! -name '_imcd.*' ! -name '_shared*' \
    ! -name '_jpeg.*' ! -name '_jpeg8.*' ! -name '_zlib.*' -delete
find "$site/imagecodecs.libs" -type f ! -name 'libjpeg-*' -delete
find "$site" -name '__pycache__' -prune -exec rm -rf {} +
find "$site" -type d -name tests -prune -exec rm -rf {} +
rm -rf "$site"/tensorboard/webfiles.zip "$site"/matplotlib/mpl-data/sample_data
mkdir -p .gpu
tar -C "$site" -cJf "$archive" .
echo "$archive: $(du -h "$archive" | cut -f1)"
