"""Inputs and context of the benchmarks: cached synthetic slides and cohorts, and the machine they ran on.

Slides and cohorts are written by the same generator as ``smt-monai synth`` into a cache folder and reused:
a 100000 px slide takes minutes to write (on one core), and every benchmark must see the same bytes.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from smt_monai.data.synth import Appearance, SlideOptions, make_cohort
from smt_monai.utils import fast_bf16, numpy_simd


def synthetic_slide(cache_dir: str | os.PathLike, size: int, seed: int = 0) -> tuple[Path, float]:
    """Path and tissue fraction of a positive synthetic slide of ``size`` px, written once into ``cache_dir``.

    The layout is that of ``smt-monai synth --out CACHE/slide_SIZE --num-slides 1 --size SIZE --seed SEED
    --positive-fraction 1``, so a slide written by that command is reused.
    """
    folder = Path(cache_dir) / f"slide_{size}" if seed == 0 else Path(cache_dir) / f"slide_{size}_seed{seed}"
    if not (folder / "cohort.json").exists():
        make_cohort(folder, 1, size, seed, positive_fraction=1.0, workers=1, progress=False)
    meta = json.loads((folder / "cohort.json").read_text())["slides"][0]
    return folder / meta["image"], float(meta["tissue_fraction"])


def synthetic_cohort(
    cache_dir: str | os.PathLike,
    num_slides: int,
    size: int,
    seed: int = 0,
    workers: int | None = None,
    contrast: float = 0.0,
    split: tuple[float, float, float] = (0.6, 0.2, 0.2),
    name: str = "",
) -> Path:
    """``datalist.json`` of a synthetic cohort, written once into ``cache_dir`` (a folder named by its
    settings, then ``name``).

    Args:
        cache_dir: where cohorts are kept.
        num_slides, size, seed, split: as ``smt-monai synth`` (``--size`` in px).
        workers: writer processes.
        contrast: ``smt-monai synth --low-mag-tumour-contrast``.
        name: the folder name's end.
    """
    suffix = f"_contrast{contrast:g}" if contrast else ""
    folder = Path(cache_dir) / f"cohort_{num_slides}x{size}_seed{seed}{suffix}{name}"
    if not (folder / "cohort.json").exists():
        options = SlideOptions(look=Appearance(low_mag_tumour_contrast=contrast))
        make_cohort(
            folder, num_slides, size, seed, split=split, options=options, workers=workers, progress=False
        )
    return folder / "datalist.json"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Machine and software versions, stored with every figure so that the report can say where it ran; also
    whether the CPU computes bfloat16 natively (then the bundle's evaluations default to bfloat16 autocast,
    elsewhere float32) and numpy's SIMD extensions (which a cohort drawn here depends on)."""
    import monai

    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "monai": monai.__version__,
        "device": str(device),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "native_bfloat16": fast_bf16(device),  # evaluations then run under bfloat16 autocast
        "numpy_simd": numpy_simd(),  # synthetic cohorts drawn here can differ with it
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
