"""The ``smt-monai`` command: ``info`` (what a slide holds) and ``synth`` (make a synthetic cohort)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from smt_monai.data.errors import SlideReadError


def slide_info(path: str, backend: str = "auto") -> dict:
    """Backend, real pyramid levels, mpp and tissue bounding box of a slide, as plain data."""
    from smt_monai.data.slide import open_slide
    from smt_monai.data.tissue import tissue_bbox

    with open_slide(path, backend) as slide:
        return {
            "path": slide.path,
            "backend": slide.backend,
            "dimensions": list(slide.dimensions),
            "levels": [
                {"level": i, "width": w, "height": h, "downsample": round(ds, 4)}
                for i, ((w, h), ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples))
            ],
            "mpp": slide.mpp,
            "tissue_bbox": [round(v, 1) for v in tissue_bbox(slide)],
        }


def _print_info(info: dict) -> None:
    mpp = f"{info['mpp']:.4f} um/px" if info["mpp"] is not None else "unknown"
    x0, y0, x1, y1 = info["tissue_bbox"]
    print(f"slide:   {info['path']}")
    print(f"backend: {info['backend']}")
    print(f"mpp:     {mpp}")
    print(f"tissue:  x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f} (level-0 px)")
    print("levels:")
    for lvl in info["levels"]:
        print(f"  {lvl['level']}: {lvl['width']} x {lvl['height']}  downsample {lvl['downsample']:g}")


def _cmd_info(args: argparse.Namespace) -> int:
    info = slide_info(args.slide, args.backend)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from smt_monai.data.synth import run_synth

    return run_synth(args)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from smt_monai.benchmark import run_benchmark

    return run_benchmark(args)


def build_parser() -> argparse.ArgumentParser:
    from smt_monai.benchmark import add_benchmark_arguments
    from smt_monai.data.synth import add_synth_arguments

    parser = argparse.ArgumentParser(prog="smt-monai", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a slide's backend, levels, mpp and tissue box")
    info.add_argument("slide")
    info.add_argument("--backend", default="auto", choices=["auto", "cucim", "openslide", "tifffile"])
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=_cmd_info)
    synth = sub.add_parser("synth", help="write a synthetic pyramidal-TIFF cohort with annotations")
    add_synth_arguments(synth)
    synth.set_defaults(func=_cmd_synth)
    benchmark = sub.add_parser("benchmark", help="SMT against dense tiling: speed, accuracy, ablations")
    add_benchmark_arguments(benchmark)
    benchmark.set_defaults(func=_cmd_benchmark)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; a slide problem prints one line and exits 2, with no traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SlideReadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
