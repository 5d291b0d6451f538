"""Synthetic slides and cohorts: the files the ``smt-monai synth`` command writes.

A cohort directory holds::

    images/slide_000.tiff          pyramidal JPEG TIFF, level 0 at ``mpp`` um/px
    annotations/slide_000.geojson  QuPath GeoJSON in level-0 px: "Tumor" polygons, and "Mimic" ones for
                                   analysis only (pen marks and debris are never annotated)
    datalist.json                  MONAI decathlon datalist: training / validation / testing lists of
                                   {"image", "label", "annotation"}, paths relative to the directory
    labels.csv                     image,label,split
    cohort.json                    generation options (lengths in um) and per-slide metadata: size in px,
                                   mpp, tissue extent in mm, section boxes, regions (radius in um), seeds

Splits are stratified by label. Slide ``i`` has its own seed derived from the cohort seed and ``i``, so a
slide's bytes do not depend on the number of worker processes or on the other slides, and its specimen
does not depend on the mpp it is written at (unless a slide size in px is asked for).
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from smt_monai.data.annotations import polygon_feature, write_geojson
from smt_monai.data.synth.pyramid import write_pyramid
from smt_monai.data.synth.render import Appearance, TileRenderer, check_mpp, fit_mimic_separation
from smt_monai.data.synth.scene import MIMIC, TUMOUR, LayoutOptions, PenStroke, Scene, Speck, make_scene

CLASS_COLOURS = {TUMOUR: (200, 0, 0), MIMIC: (0, 150, 200)}
SYNTH_HELP = (
    "write a synthetic cohort: pyramidal JPEG TIFF slides whose tumour looks like benign mimics at low "
    "magnification, QuPath GeoJSON annotations, a MONAI datalist.json and labels.csv"
)
SPLITS = ("training", "validation", "testing")
SPREAD_SIZE = 32768  # slides this big are rendered by several processes (see make_cohort)


@dataclass(frozen=True)
class SlideOptions:
    """Everything about a synthetic slide except its size, seed and label.

    Args:
        layout: tissue, suspicious-region, pen and debris layout (um).
        look: cell-level appearance (um).
        mpp: micrometres per pixel at level 0 (written to the resolution tags), in ``MPP_RANGE``.
        jpeg_quality: JPEG quality of the tiles.
        border: width in px of a black scanner border along the slide edges (0: none).
    """

    layout: LayoutOptions = field(default_factory=LayoutOptions)
    look: Appearance = field(default_factory=Appearance)
    mpp: float = 0.25
    jpeg_quality: int = 90
    border: int = 0

    def __post_init__(self) -> None:
        check_mpp(self.mpp)
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")
        if self.border < 0:
            raise ValueError(f"border must be >= 0, got {self.border}")
        if not 0.0 <= self.look.low_mag_tumour_contrast <= 1.0:
            raise ValueError(
                f"low_mag_tumour_contrast must lie in [0, 1], got {self.look.low_mag_tumour_contrast}"
            )


def make_slide(
    path: str | os.PathLike,
    size: int | None,
    seed: int,
    positive: bool,
    options: SlideOptions | None = None,
    annotation_path: str | os.PathLike | None = None,
    progress: bool = False,
    processes: int = 1,
) -> dict[str, Any]:
    """Write one synthetic slide and its annotation.

    Args:
        path: TIFF to write.
        size: side of a square slide in level-0 px (at least 1024), the tissue laid out to cover a fraction
            of it; ``None``: the slide is the tissue (an extent drawn from ``options.layout``) plus a glass
            margin, its size in px following from the mpp.
        seed: the slide's seed: the same seed (and options) gives the same bytes.
        positive: whether the slide holds tumour.
        options: slide options (defaults if ``None``).
        annotation_path: GeoJSON to write (default: ``path`` with suffix ``.geojson``).
        progress: show a progress bar over tile rows.
        processes: processes rendering and encoding tiles (the bytes written do not depend on it).

    Returns:
        Metadata: ``image``, ``annotation`` (paths as given), ``label``, ``seed``, ``width``, ``height`` (px),
        ``mpp``, ``levels`` (``[width, height]`` per level), ``downsamples``, ``tissue_fraction``,
        ``tissue_mm`` (width and height of the box around the tissue), ``sections`` (level-0 box of each
        section), ``pen_marks`` and ``debris`` (how many), and ``regions`` (class, centre and bounding box in
        level-0 px, radius in um and area in mm^2 of each suspicious region).
    """
    options = options or SlideOptions()
    path = Path(path)
    annotation_path = Path(annotation_path) if annotation_path is not None else path.with_suffix(".geojson")
    scene = slide_scene(size, seed, positive, options)
    renderer = TileRenderer(scene, options.mpp, options.look, border=options.border)
    width, height = renderer.width, renderer.height
    description = f"smt-monai synthetic whole-slide image|mpp = {options.mpp}"  # nothing about the label
    shapes = write_pyramid(
        path,
        width,
        height,
        renderer.render,
        mpp=options.mpp,
        quality=options.jpeg_quality,
        description=description,
        progress=progress,
        processes=processes,
    )
    px = 1.0 / options.mpp
    features = [polygon_feature(r.blob.polygon() * px, r.kind, CLASS_COLOURS[r.kind]) for r in scene.regions]
    write_geojson(annotation_path, features)
    regions = []
    for r in scene.regions:
        outline = r.blob.polygon() * px
        regions.append(
            {
                "class": r.kind,
                "centre": [round(c * px, 2) for c in r.blob.centre],
                "radius_um": round(r.blob.radius, 2),
                "area_mm2": round(r.blob.area * 1e-6, 5),
                "bbox": np.round(np.concatenate([outline.min(0), outline.max(0)]), 2).tolist(),
            }
        )
    x0, y0, x1, y1 = scene.tissue_box
    return {
        "image": str(path),
        "annotation": str(annotation_path),
        "label": int(positive),
        "seed": int(seed),
        "width": width,
        "height": height,
        "mpp": options.mpp,
        "levels": [list(s) for s in shapes],
        "downsamples": [width / s[0] for s in shapes],
        "tissue_fraction": round(scene.tissue_fraction, 4),
        "tissue_mm": [round((x1 - x0) * 1e-3, 3), round((y1 - y0) * 1e-3, 3)],
        "sections": [np.round(np.asarray(box) * px, 1).tolist() for box in scene.sections],
        "pen_marks": sum(isinstance(m, PenStroke) for m in scene.marks),
        "debris": sum(isinstance(m, Speck) for m in scene.marks),
        "regions": regions,
    }


def slide_scene(size: int | None, seed: int, positive: bool, options: SlideOptions) -> Scene:
    """The layout of a slide of ``size`` px (``None``: laid out physically), checking that it has at least
    1024 px a side at the options' mpp."""
    if size is not None and size < 1024:
        raise ValueError(f"a synthetic slide must be at least 1024 px wide, got {size}")
    scene = make_scene(seed, positive, options.layout, None if size is None else size * options.mpp)
    if min(scene.pixels(options.mpp)) < 1024:
        raise ValueError(
            f"a synthetic slide must be at least 1024 px a side: {scene.width * 1e-3:.2f} x "
            f"{scene.height * 1e-3:.2f} mm at {options.mpp} um/px is not; give more tissue or a finer mpp"
        )
    return scene


def slide_seed(cohort_seed: int, index: int) -> int:
    """Seed of slide ``index`` of a cohort, independent of the cohort's other slides."""
    return int(np.random.SeedSequence([cohort_seed, index]).generate_state(1, dtype=np.uint32)[0])


def stratified_split(labels: np.ndarray, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """Split index (0 training, 1 validation, 2 testing) of each slide, stratified by label.

    Within each label, the counts are the fractions of its size rounded by largest remainder, and which
    slides go where is a seeded shuffle.
    """
    fractions_ = np.asarray(fractions, dtype=np.float64) / sum(fractions)
    rng = np.random.default_rng([seed, 1])
    split = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        exact = fractions_ * len(members)
        counts = np.floor(exact).astype(np.int64)
        for i in np.argsort(-(exact - counts), kind="stable")[: len(members) - counts.sum()]:
            counts[i] += 1
        split[members] = np.repeat(np.arange(3), counts)
    return split


def _make_slide_job(job: dict[str, Any]) -> dict[str, Any]:
    return make_slide(**job)


def make_cohort(
    out_dir: str | os.PathLike,
    num_slides: int,
    size: int | None,
    seed: int,
    positive_fraction: float = 0.5,
    split: tuple[float, float, float] = (0.6, 0.2, 0.2),
    options: SlideOptions | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write a cohort of synthetic slides (see the module docstring for the files).

    Args:
        out_dir: output directory (created if needed).
        num_slides: number of slides.
        size: side of each slide in level-0 px; ``None``: each slide is its tissue plus a glass margin
            (see :func:`make_slide`).
        seed: cohort seed.
        positive_fraction: fraction of slides with tumour (rounded to whole slides).
        split: training / validation / testing fractions, applied per label.
        options: slide options (defaults if ``None``).
        workers: processes (default: CPU count, at most ``num_slides``; 1 runs in this process). A slide
            of ``SPREAD_SIZE`` px or more a side is rendered by CPU count // workers processes, so one big
            slide uses every core too.
        progress: show a progress bar.

    Returns:
        Path of ``datalist.json``.
    """
    options = options or SlideOptions()
    if num_slides < 1:
        raise ValueError(f"num_slides must be >= 1, got {num_slides}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must lie in [0, 1], got {positive_fraction}")
    if len(split) != 3 or min(split) < 0 or sum(split) <= 0:
        raise ValueError(f"split must be three non-negative fractions, got {split}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng([seed, 0])
    labels = np.zeros(num_slides, dtype=np.int64)
    labels[rng.permutation(num_slides)[: round(num_slides * positive_fraction)]] = 1
    splits = stratified_split(labels, split, seed)
    seeds = [slide_seed(seed, i) for i in range(num_slides)]
    # every slide's layout first: cheap, and a slide too small for the mpp fails before anything is written
    pixels = [slide_scene(size, s, bool(y), options).pixels(options.mpp) for s, y in zip(seeds, labels)]
    digits = max(3, len(str(num_slides - 1)))
    if options.look.mimic_separation is None:  # fit once here rather than in every worker
        look = replace(options.look, mimic_separation=fit_mimic_separation(options.look, options.mpp))
        options = replace(options, look=look)
    workers = max(1, min(workers or os.cpu_count() or 1, num_slides))
    # Each slide's rows are rendered by its share of the CPUs. Starting the render processes and sending
    # each the renderer (its 21 MB of textures) takes a moment, and 2 CPUs (often two threads of one core)
    # gain little (a 16384 px slide: 5.3 s instead of 5.8): only slides of SPREAD_SIZE px and more on 4
    # CPUs or more are spread.
    cpus = os.cpu_count() or 1
    names = [f"slide_{i:0{digits}d}" for i in range(num_slides)]
    jobs = [
        {
            "path": out / "images" / f"{name}.tiff",
            "annotation_path": out / "annotations" / f"{name}.geojson",
            "size": size,
            "seed": seeds[i],
            "positive": bool(labels[i]),
            "options": options,
            "progress": progress and num_slides == 1,
            "processes": cpus // workers if cpus >= 4 and max(pixels[i]) >= SPREAD_SIZE else 1,
        }
        for i, name in enumerate(names)
    ]
    # the largest slides first, so that no worker is left with a big one at the end
    order = sorted(range(num_slides), key=lambda i: -pixels[i][0] * pixels[i][1])
    metadata: list[dict[str, Any]] = [{} for _ in jobs]
    bar = tqdm(total=num_slides, desc="synthetic slides", unit="slide", disable=not progress)
    if workers == 1:
        for i in order:
            metadata[i] = make_slide(**jobs[i])
            bar.update()
    else:
        # forkserver: workers start from a clean process that has imported this module once (fork would
        # copy whatever threads the caller runs; spawn would import everything again in every worker)
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        if method == "forkserver":
            context.set_forkserver_preload([__name__])
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(_make_slide_job, jobs[i]): i for i in order}
            for future in as_completed(futures):
                metadata[futures[future]] = future.result()
                bar.update()
    bar.close()

    entries: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    rows = []
    for i, meta in enumerate(metadata):
        image = Path(meta["image"]).relative_to(out).as_posix()
        annotation = Path(meta["annotation"]).relative_to(out).as_posix()
        meta.update(image=image, annotation=annotation, split=SPLITS[splits[i]])
        entries[SPLITS[splits[i]]].append({"image": image, "label": int(labels[i]), "annotation": annotation})
        rows.append((image, int(labels[i]), SPLITS[splits[i]]))
    datalist = {
        "name": "smt-monai synthetic cohort",
        "description": "Synthetic H&E-like slides: tumour and benign mimic regions look alike at low "
        "magnification and differ in nuclear detail at level 0.",
        "labels": {"0": "negative", "1": "tumour"},
        "numTraining": len(entries["training"]),
        "numValidation": len(entries["validation"]),
        "numTest": len(entries["testing"]),
        **entries,
    }
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist, indent=2) + "\n")
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "label", "split"])
        writer.writerows(rows)
    cohort = {
        "seed": seed,
        "size": size,
        "mpp": options.mpp,
        "positive_fraction": positive_fraction,
        "split": list(split),
        "options": asdict(options),
        "slides": metadata,
    }
    (out / "cohort.json").write_text(json.dumps(cohort, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------
# Command line: ``smt-monai synth``


def _pair(kind: type) -> Any:
    def parse(text: str) -> tuple:
        parts = text.replace(",", " ").split()
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"expected two values MIN,MAX, got {text!r}")
        return tuple(kind(p) for p in parts)

    return parse


def add_synth_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``synth`` options to ``parser`` (for the ``smt-monai synth`` subcommand)."""
    defaults = LayoutOptions()
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--num-slides", type=int, default=48, help="number of slides (default: 48)")
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        metavar="PX",
        help="square slide side in level-0 px, the tissue covering a fraction of it (default: each slide is "
        "its tissue, of an extent drawn from --tissue-mm, plus a 0.5 mm glass margin)",
    )
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (default: 0)")
    parser.add_argument(
        "--positive-fraction", type=float, default=0.5, help="fraction of tumour slides (default: 0.5)"
    )
    parser.add_argument(
        "--split",
        type=float,
        nargs=3,
        default=(0.6, 0.2, 0.2),
        metavar=("TRAIN", "VAL", "TEST"),
        help="split fractions per label (default: 0.6 0.2 0.2)",
    )
    ranges = (
        (
            "--tissue-mm",
            float,
            tuple(v / 1000 for v in defaults.tissue_extent),
            "range of the longer side of a slide's tissue in mm, without --size",
        ),
        ("--sections", int, defaults.sections, "tissue sections per slide"),
        ("--regions", int, defaults.suspicious_regions, "suspicious regions (tumour or mimic) per slide"),
        ("--region-radius-um", float, defaults.region_radius, "range of a suspicious region's radius in um"),
    )
    for flag, kind, default, text in ranges:
        parser.add_argument(
            flag, type=_pair(kind), default=default, metavar="MIN,MAX", help=f"{text} (default: %(default)s)"
        )
    parser.add_argument(
        "--tumour-probability",
        type=float,
        default=defaults.tumour_probability,
        help="in positive slides, chance that a suspicious region is tumour (default: %(default)s)",
    )
    chances = (
        (
            "--pen-marks",
            defaults.pen_marks,
            "blue, green or black marker strokes near its tissue, never annotated",
        ),
        ("--debris", defaults.debris, "debris and dust specks on the glass"),
    )
    for flag, default, text in chances:
        parser.add_argument(
            flag,
            type=float,
            default=default,
            metavar="PROB",
            help=f"chance that a slide has {text} (default: %(default)s)",
        )
    parser.add_argument(
        "--mpp",
        type=float,
        default=0.25,
        help="um per px at level 0, 0.2 to 2 (40x: 0.25, 20x: 0.5; default: 0.25); the specimen is the same "
        "at any mpp unless --size is given",
    )
    parser.add_argument(
        "--low-mag-tumour-contrast",
        type=float,
        default=0.0,
        metavar="X",
        help="how much darker tumour is than benign mimics at low magnification, 0 to 1: 0 (default) makes "
        "them alike at 4 um/px and coarser, so a first layer cannot tell them apart; 1 makes tumour clearly "
        "darker at 8-16 um/px",
    )
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality (default: 90)")
    parser.add_argument("--border", type=int, default=0, help="black scanner border width in px (default: 0)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run_synth(args: argparse.Namespace) -> int:
    """Run ``smt-monai synth`` with parsed arguments; returns the exit status (2 on invalid options)."""
    start = time.perf_counter()
    try:
        options = SlideOptions(
            layout=LayoutOptions(
                sections=args.sections,
                tissue_extent=(args.tissue_mm[0] * 1000, args.tissue_mm[1] * 1000),
                suspicious_regions=args.regions,
                region_radius=args.region_radius_um,
                tumour_probability=args.tumour_probability,
                pen_marks=args.pen_marks,
                debris=args.debris,
            ),
            look=Appearance(low_mag_tumour_contrast=args.low_mag_tumour_contrast),
            mpp=args.mpp,
            jpeg_quality=args.jpeg_quality,
            border=args.border,
        )
        datalist = make_cohort(
            args.out,
            args.num_slides,
            args.size,
            args.seed,
            args.positive_fraction,
            tuple(args.split),
            options=options,
            workers=args.workers,
            progress=not args.quiet,
        )
    except ValueError as err:
        print(f"smt-monai synth: error: {err}", file=sys.stderr)
        return 2
    minutes = (time.perf_counter() - start) / 60
    print(f"wrote {args.num_slides} slides at {args.mpp} um/px and {datalist} in {minutes:.1f} min")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m smt_monai.data.synth``."""
    parser = add_synth_arguments(argparse.ArgumentParser(prog="smt-monai synth", description=SYNTH_HELP))
    return run_synth(parser.parse_args(argv))
