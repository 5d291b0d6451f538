"""Peak resident memory of SMT inference on one slide, measured in a fresh process.

    python -m smt_monai.benchmark.memory SLIDE [--num-focus 4] [--preset paper]

Prints one JSON line: ``model_rss_mb`` (after building the network, before the slide) and ``peak_rss_mb``
(``ru_maxrss`` after the slide). A fresh process per slide keeps one slide's peak from hiding another's.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

import psutil
import torch

from smt_monai.inference.api import SMTPredictor
from smt_monai.networks import SMT


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(path: str, num_focus: int, preset: str, backend: str, num_workers: int) -> dict[str, float]:
    """Run SMT inference on ``path`` once and report the process's memory before and after."""
    network = SMT(preset=preset).eval()
    model_rss = psutil.Process().memory_info().rss / 2**20
    predictor = SMTPredictor(network, num_focus, backend=backend, num_workers=num_workers, amp=False)
    predictor.predict(path)
    return {"model_rss_mb": round(model_rss, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("slide")
    parser.add_argument("--num-focus", type=int, default=4)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.slide, args.num_focus, args.preset, args.backend, args.num_workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
