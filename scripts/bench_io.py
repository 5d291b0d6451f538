"""Time reading SMT's 1 + K + K^2 regions from one large slide, per backend, against the decoding floor.

    python scripts/bench_io.py [--slide PATH | --size 40960] [--grid 8] [--patch-size 256] [--stem-pool 4]

The regions follow SMT's geometry (layer 1 around the tissue, K patches of it for layer 2, K patches of
each for layer 3; the patches are drawn at random since reading time does not depend on which are picked).
Every backend reads the same regions through the project's read path (`smt_monai.data.read_boxes`, which
also area-resizes each region to the layer input as the bundle reads it, ``grid * patch_size / stem_pool``
px a side); MONAI's `CuCIMWSIReader.get_data`, one region at a time
and without resizing, is timed beside it, and the floor is decoding only the JPEG tiles the regions touch,
with imagecodecs, on 1 and on 2 threads. The file is read once untimed first, so no row pays a cold cache.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from smt_monai.data import child_boxes, open_slide, read_boxes, square_around, tissue_bbox
from smt_monai.data.inspect import inspect_tiff, touched_chunks
from smt_monai.data.magnification import known_mpp
from smt_monai.data.regions import plan_read
from smt_monai.data.slide import BACKENDS, cucim_available


def smt_pattern(slide_path: str, k: int, grid: int, seed: int = 0) -> list[np.ndarray]:
    """Level-0 boxes of the three layers: ``[(1, 3), (K, 3), (K*K, 3)]``."""
    rng = np.random.default_rng(seed)
    with open_slide(slide_path) as slide:
        layer1 = square_around(tissue_bbox(slide, known_mpp(slide)))[None]
    picks = np.stack([rng.choice(grid * grid, k, replace=False)])
    layer2 = child_boxes(layer1, picks, grid).reshape(-1, 3)
    picks = np.stack([rng.choice(grid * grid, k, replace=False) for _ in range(k)])
    layer3 = child_boxes(layer2, picks, grid).reshape(-1, 3)
    return [layer1, layer2, layer3]


def time_project(path: str, backend: str, layers: list[np.ndarray], read_size: int, workers: int) -> float:
    with open_slide(path, backend) as slide:
        start = time.perf_counter()
        for boxes in layers:
            read_boxes(slide, boxes, read_size, num_workers=workers)
        return time.perf_counter() - start


def time_project_reads(
    path: str, backend: str, layers: list[np.ndarray], read_size: int, workers: int
) -> float:
    """The project's batched reads alone (``Slide.read_regions`` per layer), without the area resize."""
    with open_slide(path, backend) as slide:
        plans = [[plan_read(slide, box, read_size) for box in boxes] for boxes in layers]
        start = time.perf_counter()
        for layer in plans:
            level, _, side = layer[0]
            slide.read_regions([loc for _, loc, _ in layer], level, (side, side), workers)
        return time.perf_counter() - start


def time_monai_one_by_one(path: str, layers: list[np.ndarray], read_size: int) -> float:
    """MONAI's own API, region by region: ``WSIReader(backend='cucim').get_data``."""
    from monai.data import WSIReader

    reader = WSIReader(backend="cucim")
    with open_slide(path) as slide:
        plans = [plan_read(slide, box, read_size) for boxes in layers for box in boxes]
    wsi = reader.read(path)
    start = time.perf_counter()
    for level, (x, y), side in plans:
        w, h = reader.get_size(wsi, level)[::-1]
        ds = reader.get_downsample_ratio(wsi, level)
        x0, y0 = max(0, x), max(0, y)
        sw = max(1, min(side, int(w - x0 / ds)))
        sh = max(1, min(side, int(h - y0 / ds)))
        reader.get_data(wsi, location=(y0, x0), size=(sh, sw), level=level)
    return time.perf_counter() - start


def time_floor(path: str, layers: list[np.ndarray], read_size: int, workers: int) -> float:
    """Decode only the JPEG tiles the regions touch (each tile once per region), nothing else."""
    import imagecodecs

    info = inspect_tiff(path)
    with open_slide(path, "tifffile") as slide:
        plans = [plan_read(slide, box, read_size) for boxes in layers for box in boxes]
        downsamples = slide.level_downsamples
        page_tables = {}
        import tifffile

        with tifffile.TiffFile(path) as tif:
            for i, lvl in enumerate(info.levels):
                page_tables[i] = tif.pages[lvl.page_index].jpegtables
    jobs = []
    for level, (x, y), side in plans:
        lvl = info.levels[level]
        x0, y0 = max(0, int(x / downsamples[level])), max(0, int(y / downsamples[level]))
        x1, y1 = min(lvl.width, x0 + side), min(lvl.height, y0 + side)
        if x0 < x1 and y0 < y1:
            jobs += [(level, index) for index, _, _ in touched_chunks(lvl, x0, y0, x1, y1)]
    with open(path, "rb") as fh:
        blobs = []
        for level, index in jobs:
            fh.seek(info.levels[level].offsets[index])
            blobs.append((fh.read(info.levels[level].bytecounts[index]), page_tables[level]))
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda b: imagecodecs.jpeg8_decode(b[0], tables=b[1]), blobs))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slide", help="an existing slide; otherwise one is generated")
    parser.add_argument("--size", type=int, default=40960, help="side of the generated slide")
    parser.add_argument("--workdir", default="runs/bench_io", help="where the generated slide is kept")
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--stem-pool", type=int, default=4, help="the patch stem's pooling (paper preset: 4)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()
    path = args.slide
    if path is None:
        from smt_monai.data.synth import make_slide

        path = str(Path(args.workdir) / f"synthetic_{args.size}.tif")
        if not Path(path).exists():
            Path(args.workdir).mkdir(parents=True, exist_ok=True)
            print(f"generating {path} ({args.size} x {args.size}) ...", flush=True)
            make_slide(path, size=args.size, seed=0, positive=True)
    read_size = args.grid * args.patch_size // args.stem_pool  # the network's read_size
    with open_slide(path) as slide:
        print(f"slide {path}: {slide.dimensions[0]} x {slide.dimensions[1]}, levels {slide.level_dimensions}")
    backends = [b for b in BACKENDS if b != "cucim" or cucim_available()]
    for k in args.ks:
        layers = smt_pattern(path, k, args.grid)
        n = sum(len(b) for b in layers)
        print(f"\nK = {k}: {n} regions, each read at the coarsest sufficient level, output {read_size} px")
        time_project(path, "tifffile", layers, read_size, args.workers)  # warm the page cache
        rows = {
            f"project read path, {b}": time_project(path, b, layers, read_size, args.workers)
            for b in backends
        }
        for b in backends:
            rows[f"project reads without resize, {b}"] = time_project_reads(
                path, b, layers, read_size, args.workers
            )
        if cucim_available():
            rows["MONAI CuCIMWSIReader.get_data, one region at a time"] = time_monai_one_by_one(
                path, layers, read_size
            )
        floors = {w: time_floor(path, layers, read_size, w) for w in (1, args.workers)}
        for w, t in floors.items():
            rows[f"floor: decode touched JPEG tiles only, {w} thread(s)"] = t
        best_other = min(t for name, t in rows.items() if name.startswith(("MONAI", "floor")))
        ours = min(t for name, t in rows.items() if name.startswith("project reads"))
        for name, seconds in rows.items():
            print(f"  {seconds:7.3f} s  {name}")
        print(f"  project reads / best of MONAI and the floor: {ours / best_other:.2f}x (target <= 1.5)")


if __name__ == "__main__":
    main()
