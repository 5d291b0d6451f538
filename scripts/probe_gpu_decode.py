"""Time cuCIM decoding the same level-0 regions on the CPU (every core) and on the GPU (nvJPEG).

SMT's reads go through the CPU path (``Slide.read_regions``); this probe says what GPU decoding would change
on the machine at hand: ``python scripts/probe_gpu_decode.py SLIDE``. The regions are spread over the
tissue, like the 1 + K + K^2 regions of a K = 4 cascade, and are as big as the last layer's regions on that
slide (the tissue box's side / grid^2, the regions SMT reads at level 0) unless ``--side`` says otherwise;
each path runs once untimed, then ``--repeats`` times (median printed). GPU output stays on the GPU (a
CuImage), as a GPU pipeline would use it.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide")
    parser.add_argument(
        "--side", type=int, default=None, help="region side, level-0 px (default: the last layer's)"
    )
    parser.add_argument("--grid", type=int, default=8, help="patches per layer side (default 8, the paper's)")
    parser.add_argument("--count", type=int, default=21, help="regions (default 21: 1 + 4 + 16)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from cucim import CuImage

    try:
        import cupy
    except ImportError:  # the CPU path needs no CuPy; the GPU path reports it as its failure
        cupy = None

    from smt_monai.data.magnification import known_mpp
    from smt_monai.data.slide import open_slide
    from smt_monai.data.tissue import tissue_bbox

    with open_slide(args.slide, "cucim") as slide:
        x0, y0, x1, y1 = tissue_bbox(slide, known_mpp(slide))
    side = args.side or max(1, round(max(x1 - x0, y1 - y0) / args.grid**2))
    rng = np.random.default_rng(0)
    xs = rng.uniform(x0, max(x0, x1 - side), args.count).astype(int)
    ys = rng.uniform(y0, max(y0, y1 - side), args.count).astype(int)
    locations = [(int(x), int(y)) for x, y in zip(xs, ys)]
    image = CuImage(args.slide)
    size = (side, side)

    def read(device: str) -> float:
        start = time.perf_counter()
        batches = image.read_region(
            location=locations,
            size=size,
            level=0,
            num_workers=os.cpu_count() or 1,
            batch_size=len(locations),
            device=device,
        )
        for batch in batches:
            if device == "cuda":
                cupy.asarray(batch)
                cupy.cuda.Device().synchronize()
            else:
                np.asarray(batch)
        return time.perf_counter() - start

    megapixels = args.count * side * side / 1e6
    for device in ("cpu", "cuda"):
        if device == "cuda" and cupy is None:
            print("cuCIM cuda decoding: failed (CuPy is not installed)")
            continue
        try:
            read(device)
            seconds = float(np.median([read(device) for _ in range(args.repeats)]))
        except Exception as exc:  # noqa: BLE001 - a probe reports what fails and goes on
            print(f"cuCIM {device} decoding: failed ({type(exc).__name__}: {exc})")
            continue
        print(
            f"cuCIM {device} decoding: {args.count} regions of {side} px in {seconds:.3f} s "
            f"({megapixels / seconds:.0f} Mpx/s)"
        )


if __name__ == "__main__":
    main()
