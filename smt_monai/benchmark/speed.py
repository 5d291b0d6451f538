"""Speed: per-slide wall time of SMT (K = 4, 8), of the dense baseline, and of SMT's reads alone.

All three run in this process, on the same slide, through the same reader (:mod:`smt_monai.data.regions`)
and the same torch threads. Each timed run opens the slide afresh, so opening, the tissue box and the
layer-1 read are part of every figure (the operating system's file cache is warm for all of them alike).

- SMT: ``SMTPredictor.predict`` with random weights (time does not depend on them), the next layer's
  regions read in a background thread while the network works, as every inference runs it, without the
  output writers. Regions are read at the network's ``read_size`` (``grid * patch_size //
  stem_pool``), as the bundle reads them.
- I/O floor: open, tissue box, and reading exactly the 1 + K + K^2 regions SMT read, at the side SMT read
  them, nothing else.
- Dense: every tissue tile of ``patch_size`` px at level 0 through ResNet-18 (stride-2 stem, channels-last)
  and attention-MIL; ``max_tiles`` tiles spread over the tissue are timed and the rest extrapolated.
- Memory: peak resident memory of SMT inference per slide, in a fresh process per slide size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smt_monai.baselines.dense import DenseMIL, predict_dense, tile_tissue
from smt_monai.benchmark.fixtures import environment, synthetic_slide
from smt_monai.data.errors import SlideReadError
from smt_monai.data.geometry import square_around
from smt_monai.data.magnification import known_mpp
from smt_monai.data.regions import read_boxes
from smt_monai.data.slide import open_slide
from smt_monai.data.tissue import tissue_bbox
from smt_monai.inference.api import SMTPredictor
from smt_monai.networks import SMT
from smt_monai.utils import fast_bf16


def run_smt(
    network: SMT,
    path: str,
    num_focus: int,
    backend: str = "auto",
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    amp: bool = False,
) -> dict[str, Any]:
    """One SMT inference on ``path`` from a closed slide; returns seconds, their split, and the boxes read.

    ``read_wait`` is the time the network waited for regions (reads not hidden behind compute), ``layer1``
    the open, tissue box and layer-1 read, ``compute`` the network.
    """
    start = time.perf_counter()
    predictor = SMTPredictor(
        network, num_focus, backend=backend, num_workers=num_workers, device=device, amp=amp
    )
    view = predictor.view(path)
    prediction = predictor.predict_view(view)
    seconds = time.perf_counter() - start
    predictor.close()
    if prediction.error:
        raise SlideReadError(path, prediction.error)
    return {
        "seconds": seconds,
        "layer1": view["load_s"],
        "read_wait": prediction.read_s - view["load_s"],
        "compute": prediction.compute_s,
        "boxes": prediction.boxes,
    }


def run_floor(
    path: str, boxes: Sequence[np.ndarray], read_size: int, backend: str, num_workers: int
) -> float:
    """Seconds to open ``path``, find its tissue box and read ``boxes`` (an array per layer), nothing else."""
    start = time.perf_counter()
    with open_slide(path, backend) as slide:
        square_around(tissue_bbox(slide, known_mpp(slide)))
        for layer_boxes in boxes:
            read_boxes(slide, layer_boxes, read_size, num_workers)
    return time.perf_counter() - start


def run_dense(
    network: DenseMIL,
    path: str,
    tile_size: int,
    max_tiles: int,
    backend: str = "auto",
    num_workers: int = 2,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    amp: bool = False,
) -> dict[str, Any]:
    """Dense-baseline seconds on ``path``: setup (open, tissue tiles) + per-tile cost x all tissue tiles.

    When the slide has more than ``max_tiles`` tissue tiles, an evenly spread subset of ``max_tiles`` is
    encoded and the time extrapolated linearly (the per-tile work does not depend on the tile).
    """
    start = time.perf_counter()
    with open_slide(path, backend) as slide:
        boxes = tile_tissue(slide, tile_size, known_mpp(slide))
        setup = time.perf_counter() - start
        timed = boxes
        if len(boxes) > max_tiles:
            timed = boxes[np.linspace(0, len(boxes) - 1, max_tiles).round().astype(int)]
        start = time.perf_counter()
        result = predict_dense(network, slide, tile_size, timed, num_workers, batch_size, device, amp)
        encode = time.perf_counter() - start
    per_tile = encode / max(1, len(timed))
    return {
        "seconds": setup + per_tile * len(boxes),
        "setup": setup,
        "seconds_per_tile": per_tile,
        "tiles_total": len(boxes),
        "tiles_timed": len(timed),
        "extrapolated": len(timed) < len(boxes),
        "read_wait": result["read_s"],
        "compute": result["compute_s"],
    }


def measure_memory(
    path: str, num_focus: int, preset: str, backend: str, threads: int | None
) -> dict[str, float]:
    """Peak RSS of SMT inference on ``path``, in a fresh process (see :mod:`smt_monai.benchmark.memory`)."""
    command = [sys.executable, "-m", "smt_monai.benchmark.memory", str(path), "--num-focus", str(num_focus)]
    command += ["--preset", preset, "--backend", backend] + (["--threads", str(threads)] if threads else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def benchmark_speed(
    cache_dir: str | Path,
    size: int = 60000,
    slide: str | None = None,
    sizes: Sequence[int] = (20000, 60000, 100000),
    focus: Sequence[int] = (4, 8),
    preset: str = "paper",
    patch_size: int = 256,
    max_tiles: int = 2000,
    repeats: int = 3,
    backend: str = "auto",
    num_workers: int = 2,
    device: str = "cpu",
    amp: bool | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """All speed figures as a flat dict with stable keys (see the module docstring for what each times).

    Args:
        cache_dir: where synthetic slides are written once and reused.
        size: side of the synthetic slide timed in full (ignored with ``slide``).
        slide: a slide to time instead of a synthetic one.
        sizes: slide sides of the size sweep (SMT time, dense estimate and peak memory per size).
        focus: the K values timed.
        preset: SMT architecture (``paper``: depth 12, width 384, grid 8, patch 256).
        patch_size: dense tile side (SMT's patch size, level 0).
        max_tiles: dense tiles actually encoded before extrapolating.
        repeats: timed runs per figure (the median is reported) after one warm-up.
        backend, num_workers, device: reading and compute settings shared by all methods.
        amp: bfloat16 autocast for both networks (default: where it is fast, ``fast_bf16``).
        progress: print what is being timed.
    """
    say = print if progress else (lambda *a, **k: None)
    device_t = torch.device(device)
    amp = fast_bf16(device_t) if amp is None else amp
    tissue = None
    if slide is None:
        slide_path, tissue = synthetic_slide(cache_dir, size)
        slide = str(slide_path)
    with open_slide(slide, backend) as opened:
        width, height = opened.dimensions
        backend_used = opened.backend
    smt = SMT(preset=preset).eval().to(device_t)
    dense = DenseMIL().eval().to(device_t).to(memory_format=torch.channels_last)
    out: dict[str, Any] = {
        "environment": environment(device_t),
        "slide": slide,
        "slide_width": width,
        "slide_height": height,
        "tissue_fraction": tissue,
        "backend": backend_used,
        "preset": preset,
        "read_size": int(smt.read_size),
        "network_side": int(smt.input_size),
        "grid": int(smt.grid),
        "num_workers": num_workers,
        "amp": amp,
        "repeats": repeats,
    }
    for k in focus:
        say(f"SMT K={k}: warm-up + {repeats} runs")
        run_smt(smt, slide, k, backend, num_workers, device_t, amp)
        runs = [run_smt(smt, slide, k, backend, num_workers, device_t, amp) for _ in range(repeats)]
        side = int(smt.read_size)
        floor = [run_floor(slide, runs[0]["boxes"], side, backend, num_workers)]
        floor += [run_floor(slide, runs[0]["boxes"], side, backend, num_workers) for _ in runs]
        out[f"regions_k{k}"] = 1 + k + k * k
        out[f"smt_seconds_k{k}"] = _median(runs, "seconds")
        out[f"smt_layer1_seconds_k{k}"] = _median(runs, "layer1")
        out[f"smt_read_wait_seconds_k{k}"] = _median(runs, "read_wait")
        out[f"smt_compute_seconds_k{k}"] = _median(runs, "compute")
        out[f"floor_seconds_k{k}"] = float(np.median(floor[1:]))
        out[f"smt_over_floor_k{k}"] = out[f"smt_seconds_k{k}"] / out[f"floor_seconds_k{k}"]
        say(f"  {out[f'smt_seconds_k{k}']:.3f} s/slide, I/O floor {out[f'floor_seconds_k{k}']:.3f} s")
    say(f"dense: up to {max_tiles} tiles of {patch_size} px")
    run_dense(dense, slide, patch_size, min(max_tiles, 64), backend, num_workers, device=device_t, amp=amp)
    dense_run = run_dense(dense, slide, patch_size, max_tiles, backend, num_workers, device=device_t, amp=amp)
    out.update({f"dense_{key}": value for key, value in dense_run.items()})
    for k in focus:
        out[f"dense_over_smt_k{k}"] = out["dense_seconds"] / out[f"smt_seconds_k{k}"]
    note = "extrapolated from" if dense_run["extrapolated"] else "measured on all"
    timed = f"{dense_run['tiles_timed']} of {dense_run['tiles_total']}"
    say(f"  {out['dense_seconds']:.1f} s/slide ({note} {timed} tissue tiles)")
    settings = (preset, patch_size, backend, num_workers, device_t, amp, say)
    out["by_size"] = [
        _size_point(cache_dir, s, smt, s == size and tissue is not None, out, focus[0], *settings)
        for s in sizes
    ]
    return out


def _size_point(
    cache_dir: str | Path,
    size: int,
    smt: SMT,
    known: bool,
    measured: dict[str, Any],
    k: int,
    preset: str,
    patch_size: int,
    backend: str,
    num_workers: int,
    device: torch.device,
    amp: bool,
    say: Any,
) -> dict[str, Any]:
    """SMT time, dense estimate (this size's tissue tiles x the measured per-tile cost) and peak memory."""
    path, tissue = synthetic_slide(cache_dir, size)
    say(f"size {size}: SMT K={k}, dense estimate, peak memory")
    if known:
        smt_seconds = measured[f"smt_seconds_k{k}"]
    else:
        run_smt(smt, str(path), k, backend, num_workers, device, amp)
        smt_seconds = run_smt(smt, str(path), k, backend, num_workers, device, amp)["seconds"]
    with open_slide(str(path), backend) as slide:
        tiles = len(tile_tissue(slide, patch_size, known_mpp(slide)))
    memory = measure_memory(str(path), k, preset, backend, torch.get_num_threads())
    return {
        "size": size,
        "tissue_fraction": tissue,
        f"smt_seconds_k{k}": smt_seconds,
        "dense_tiles": tiles,
        "dense_seconds": measured["dense_setup"] + tiles * measured["dense_seconds_per_tile"],
        **memory,
    }
