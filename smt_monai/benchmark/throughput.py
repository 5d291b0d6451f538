"""Throughput: slides per hour of ``smt-monai predict`` over a slide list, for 1 and 2 processes (job-array
shards on one machine) and 1 and 2 slides in flight per process.

Every run predicts the same list into a fresh output folder, in separate ``smt-monai predict`` processes
started together (the shards of ``--shard I/N``), so the figure is what a user gets: model loading, the
layer-1 views, the cascade, every output file and the tables (the merge of the shards included). The list is
``num_slides`` links to one synthetic slide (each slide read from the operating system's file cache after the
first, as in the speed benchmark), predicted by a randomly initialised model of the chosen preset.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from smt_monai.benchmark.fixtures import environment, synthetic_slide
from smt_monai.inference.model import ModelCard, save_model
from smt_monai.networks import SMT


def slide_list(work_dir: Path, size: int, num_slides: int) -> Path:
    """A text list of ``num_slides`` hard links (or copies) of the synthetic slide of ``size`` px."""
    source, _ = synthetic_slide(work_dir, size)
    folder = work_dir / f"throughput_{size}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(num_slides):
        path = folder / f"slide_{index:04d}{source.suffix}"
        if not path.exists():
            try:
                os.link(source, path)
            except OSError:
                shutil.copy(source, path)
        paths.append(str(path))
    listing = folder / "slides.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing


def timed_run(listing: Path, model: Path, out: Path, processes: int, in_flight: int, device: str) -> float:
    """Seconds for ``processes`` shards (``in_flight`` slides each) to predict the list and merge."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "smt_monai.cli", "predict", str(listing), "-m", str(model), "-o",
               str(out), "--device", device, "--slides-in-flight", str(in_flight), "--quiet"]  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    shards = [
        subprocess.Popen([*command, *(["--shard", f"{i}/{processes}"] if processes > 1 else [])], env=env)
        for i in range(processes)
    ]
    if any(shard.wait() != 0 for shard in shards):
        raise RuntimeError(f"a throughput run failed: {' '.join(command)}")
    if processes > 1:
        subprocess.run([sys.executable, "-m", "smt_monai.cli", "merge", str(out)], check=True, env=env)
    return time.perf_counter() - start


def benchmark_throughput(
    work_dir: str | Path,
    size: int = 60000,
    num_slides: int = 16,
    preset: str = "paper",
    processes: Sequence[int] = (1, 2),
    in_flight: Sequence[int] = (1, 2),
    num_focus: int = 4,
    device: str = "cpu",
) -> dict[str, Any]:
    """Slides per hour for every combination of ``processes`` and ``in_flight`` (stable keys:
    ``slides_per_hour_p{P}_f{F}``)."""
    work = Path(work_dir)
    listing = slide_list(work, size, num_slides)
    torch.manual_seed(0)
    network = SMT(preset=preset)
    model = save_model(
        network, ModelCard.for_training(network, preset, num_focus=num_focus), work / f"model_{preset}.pt"
    )
    out: dict[str, Any] = {
        "environment": environment(device),
        "slide_size": size,
        "num_slides": num_slides,
        "preset": preset,
        "num_focus": num_focus,
        "runs": [],
    }
    for p in processes:
        for f in in_flight:
            seconds = timed_run(listing, model, work / "throughput_out", p, f, device)
            rate = num_slides / seconds * 3600
            out["runs"].append({"processes": p, "in_flight": f, "seconds": seconds, "slides_per_hour": rate})
            out[f"slides_per_hour_p{p}_f{f}"] = rate
    shutil.rmtree(work / "throughput_out", ignore_errors=True)
    return out
