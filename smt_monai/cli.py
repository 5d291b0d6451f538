"""The ``smt-monai`` command: predict slides with a trained model, look at a slide or a model file, make a
synthetic cohort, run the benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from smt_monai import __version__
from smt_monai.arguments import at_least, device, positive
from smt_monai.data.errors import UserError


def slide_info(path: str, backend: str = "auto") -> dict:
    """Backend, real pyramid levels, mpp, and the tissue (bounding box, sections, area) of a slide, as plain
    data."""
    from smt_monai.data.magnification import known_mpp
    from smt_monai.data.slide import open_slide
    from smt_monai.data.tissue import bounding_box, tissue_components, tissue_map

    with open_slide(path, backend) as slide:
        mpp = known_mpp(slide)
        found = tissue_map(slide, mpp)
        sections = tissue_components(slide, mpp, found)
        area = found.area_mm2
        return {
            "path": slide.path,
            "backend": slide.backend,
            "dimensions": list(slide.dimensions),
            "levels": [
                {"level": i, "width": w, "height": h, "downsample": round(ds, 4)}
                for i, ((w, h), ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples))
            ],
            "mpp": slide.mpp,
            "tissue_bbox": [round(v, 1) for v in bounding_box(sections)],
            "tissue_sections": 0 if found.blank else len(sections),
            "tissue_mm2": None if area is None else round(area, 3),
        }


def _print_info(info: dict) -> None:
    mpp = f"{info['mpp']:.4f} um/px" if info["mpp"] is not None else "unknown"
    x0, y0, x1, y1 = info["tissue_bbox"]
    print(f"slide:   {info['path']}")
    print(f"backend: {info['backend']}")
    print(f"mpp:     {mpp}")
    area = "" if info["tissue_mm2"] is None else f", {info['tissue_mm2']:.2f} mm^2"
    if info["tissue_sections"]:
        sections = f"{info['tissue_sections']} section{'s' * (info['tissue_sections'] > 1)}{area}"
        print(f"tissue:  {sections}, x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f} (level-0 px)")
    else:
        print("tissue:  none found (a blank or failed scan, or very pale staining)")
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


def slide_entries(sources: Sequence[str]) -> list[dict]:
    """Slides from command-line arguments: slide files, folders of slides, and lists (datalist JSON, CSV with
    an ``image`` column, text files of paths), in the order given."""
    from smt_monai.data.datalist import load_slide_list

    entries: list[dict] = []
    for source in sources:
        if Path(source).exists():
            entries += load_slide_list(source)
        else:
            entries.append({"image": source})  # a missing slide becomes an error row, not a dead run
    return entries


def _cmd_predict(args: argparse.Namespace) -> int:
    from smt_monai.inference import SlideListPredictor, load_model
    from smt_monai.inference.predictor import summary_line

    slides = slide_entries(args.slides)
    network = load_model(args.model, args.device)
    predictor = SlideListPredictor(
        network,
        slides,
        args.output,
        num_focus=args.k,
        backend=args.backend,
        num_workers=args.workers,
        device=args.device,
        amp=None,
        progress=not args.quiet,
        default_mpp=args.default_mpp,
        gallery_top=args.gallery,
        slides_in_flight=args.slides_in_flight,
        slide_timeout=args.slide_timeout,
        shard=args.shard,
    )
    summary = predictor.run()
    if args.shard:
        print(f"shard {args.shard} done; when every shard is: smt-monai merge {args.output}")
    else:
        print(summary_line(summary, args.output))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from smt_monai.inference.outputs import merge
    from smt_monai.inference.predictor import summary_line

    print(summary_line(merge(args.output), args.output))
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    from smt_monai.inference import ModelCard, load_model

    card = ModelCard.of(load_model(args.model))
    print(json.dumps(card.to_dict(), indent=2) if args.json else card.describe())
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from smt_monai.data.synth import run_synth

    return run_synth(args)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from smt_monai.benchmark import run_benchmark

    return run_benchmark(args)


def build_parser() -> argparse.ArgumentParser:
    from smt_monai.benchmark import add_benchmark_arguments
    from smt_monai.data.synth import SYNTH_HELP, add_synth_arguments

    parser = argparse.ArgumentParser(
        prog="smt-monai",
        description="SMT (Self-reform Multilayer Transformer): fast whole-slide image classification that "
        "reads only the regions it focuses on. Predict slides with a trained model, look at a slide or a "
        "model file, make a synthetic cohort, or run the benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"smt-monai {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    predict = sub.add_parser(
        "predict",
        help="predict slides with a trained model",
        description="Predict slides with a trained model: predictions.csv and summary.json in OUT, and per "
        "slide a QuPath GeoJSON of where the model looked, an overlay, a gallery of the deciding regions and "
        "a focus map. K, the aggregation and the threshold are the model's own unless given.",
    )
    predict.add_argument(
        "slides", nargs="+", help="slide files, folders of slides, or lists (JSON, CSV, text)"
    )
    predict.add_argument("--model", "-m", required=True, help="the trained model (model.pt or model.ts)")
    predict.add_argument("--output", "-o", required=True, help="the folder results go to")
    predict.add_argument(
        "--k", type=at_least(1), default=None, help="regions focused per step (default: the model's)"
    )
    predict.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    predict.add_argument(
        "--default-mpp",
        "--default_mpp",  # the bundle's spelling, which the error for a slide without mpp names
        type=positive,
        default=None,
        help="micrometres per pixel of slides whose file holds none",
    )
    predict.add_argument("--backend", default="auto", choices=["auto", "cucim", "openslide", "tifffile"])
    predict.add_argument(
        "--workers", type=at_least(1), default=2, help="threads reading regions (default: 2)"
    )
    predict.add_argument(
        "--gallery", type=at_least(0), default=8, help="regions shown in gallery.jpg (0: none)"
    )
    predict.add_argument(
        "--slides-in-flight",
        type=at_least(1),
        default=1,
        help="slides predicted at once, each in a thread (default: 1)",
    )
    predict.add_argument(
        "--slide-timeout",
        type=positive,
        default=None,
        help="seconds a slide may take before it is an error row",
    )
    predict.add_argument(
        "--shard", default=None, metavar="I/N", help="predict every N-th slide from the I-th (job arrays)"
    )
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(func=_cmd_predict)
    merge = sub.add_parser(
        "merge", help="one predictions.csv and summary.json from the shards' results in OUT (input order)"
    )
    merge.add_argument("output", help="the OUT folder the shards wrote to")
    merge.set_defaults(func=_cmd_merge)
    model = sub.add_parser("model", help="print what a model file says about itself")
    model.add_argument("model")
    model.add_argument("--json", action="store_true", help="print the whole model card as JSON")
    model.set_defaults(func=_cmd_model)
    info = sub.add_parser("info", help="print a slide's backend, levels, mpp and tissue box")
    info.add_argument("slide")
    info.add_argument("--backend", default="auto", choices=["auto", "cucim", "openslide", "tifffile"])
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=_cmd_info)
    synth = sub.add_parser(
        "synth",
        help="write a synthetic pyramidal-TIFF cohort (diagnosis or grading) with annotations",
        description=SYNTH_HELP,
    )
    add_synth_arguments(synth)
    synth.set_defaults(func=_cmd_synth)
    benchmark = sub.add_parser("benchmark", help="SMT against dense tiling: speed, accuracy, ablations")
    add_benchmark_arguments(benchmark)
    benchmark.set_defaults(func=_cmd_benchmark)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; a problem with a slide, a list or a model file prints one line and exits 2, with
    no traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: what is finished is on disk (every file is written atomically, a half-written one is a
        # temporary file the rerun removes) and a rerun goes on from it. Exit at once: a slide's thread may
        # still be inside a native reader, and finalising the interpreter under it aborts the process.
        print(
            "interrupted: the slides finished so far are kept; the same command goes on from them",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    except BrokenPipeError:
        # the reader went away (smt-monai model M | head): stop quietly, as shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
