"""Synthetic slides and cohorts: the files the ``smt-monai synth`` command writes.

A cohort directory holds::

    images/slide_000.tiff          pyramidal JPEG TIFF, level 0 at ``mpp`` um/px
    annotations/slide_000.geojson  QuPath GeoJSON in level-0 px: "Tumor" polygons (in a graded cohort, one
                                   class per grade, named as the datalist names the slide class of that
                                   grade: "grade 1", "grade 2", ...), and "Mimic" ones for analysis only
                                   (pen marks and debris are never annotated)
    datalist.json                  MONAI decathlon datalist: training / validation / testing lists of
                                   {"image", "label", "annotation"}, paths relative to the directory, and
                                   the class names ("labels": {"0": "negative", "1": "tumour"}, or
                                   {"0": "benign", "1": "grade 1", ...}); with ``--survival`` also each
                                   slide's survival "time" (months) and "event"
    labels.csv                     image,label,split (and time,event)
    cohort.json                    generation options (lengths in um) and per-slide metadata: size in px,
                                   mpp, tissue extent in mm, section boxes, regions (class, grade, radius in
                                   um), seeds, and what drew them (``drawn_with``: numpy's SIMD extensions
                                   and the versions of numpy, imagecodecs and tifffile)

The task is diagnosis (two classes: does the slide hold tumour) or grading (C >= 3 classes: benign, then
the grade of the slide's worst tumour region; see :mod:`.scene`). Diagnosis labels follow a positive
fraction, grading labels are balanced over the classes. Splits are stratified by label. Slide ``i`` has
its own seed derived from the cohort seed and ``i``, so a slide's bytes do not depend on the number of
worker processes or on the other slides, and its specimen does not depend on the mpp it is written at
(unless a slide size in px is asked for). Its bytes can depend on the CPU: see :func:`drawn_with`.
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
from smt_monai.data.synth.render import (
    TUMOUR_CONTRAST_INK,
    Appearance,
    TileRenderer,
    check_mpp,
    fit_mimic_separation,
)
from smt_monai.data.synth.scene import (
    MIMIC,
    TUMOUR,
    LayoutOptions,
    PenStroke,
    Region,
    Scene,
    Speck,
    make_scene,
)
from smt_monai.utils import numpy_simd

TUMOUR_COLOUR, LOW_GRADE_COLOUR, MIMIC_COLOUR = (200, 0, 0), (235, 190, 0), (0, 150, 200)
SYNTH_HELP = (
    "write a synthetic cohort: pyramidal JPEG TIFF slides whose tumour looks like benign mimics at low "
    "magnification, QuPath GeoJSON annotations, a MONAI datalist.json and labels.csv. --task diagnosis "
    "(default): is there tumour in the slide. --task grading: benign or grade 1 to C - 1, the grade of the "
    "slide's worst tumour region, which shows only at high magnification (its share of large atypical "
    "nuclei among lymphoid-like ones)"
)
TASKS = {"diagnosis": 2, "grading": 4}  # task: default number of classes
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


def label_names(num_classes: int) -> list[str]:
    """Names of the slide classes of a cohort of ``num_classes`` classes, as its datalist gives them:
    negative and tumour (diagnosis), or benign and grade 1 to ``num_classes - 1`` (grading)."""
    if num_classes == 2:
        return ["negative", "tumour"]
    return ["benign"] + [f"grade {g}" for g in range(1, num_classes)]


def region_class(region: Region, num_classes: int) -> tuple[str, tuple[int, int, int]]:
    """Annotation class and colour of a region: "Mimic"; "Tumor" in a binary slide; in a graded one the
    name of its grade's slide class (:func:`label_names`), coloured from yellow (grade 1) to red (the
    highest)."""
    if region.kind == MIMIC:
        return MIMIC, MIMIC_COLOUR
    if num_classes == 2:
        return TUMOUR, TUMOUR_COLOUR
    t = (region.grade - 1) / (num_classes - 2)
    colour = tuple(round(a + (b - a) * t) for a, b in zip(LOW_GRADE_COLOUR, TUMOUR_COLOUR, strict=True))
    return label_names(num_classes)[region.grade], colour


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
        positive: the slide's label, in ``0 .. options.layout.num_classes - 1``: whether it holds tumour
            (``True`` or 1), or its grade (see :func:`~.scene.make_scene`).
        options: slide options (defaults if ``None``).
        annotation_path: GeoJSON to write (default: ``path`` with suffix ``.geojson``).
        progress: show a progress bar over tile rows.
        processes: processes rendering and encoding tiles (the bytes written do not depend on it).

    Returns:
        Metadata: ``image``, ``annotation`` (paths as given), ``label``, ``seed``, ``width``, ``height`` (px),
        ``mpp``, ``levels`` (``[width, height]`` per level), ``downsamples``, ``tissue_fraction``,
        ``tissue_mm`` (width and height of the box around the tissue), ``sections`` (level-0 box of each
        section), ``pen_marks`` and ``debris`` (how many), and ``regions`` (annotation class, grade, centre
        and bounding box in level-0 px, radius in um and area in mm^2 of each suspicious region).
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
    classes = [region_class(r, scene.num_classes) for r in scene.regions]
    outlines = [r.blob.polygon() * px for r in scene.regions]
    write_geojson(annotation_path, [polygon_feature(o, *c) for o, c in zip(outlines, classes, strict=True)])
    regions = []
    for r, outline, (name, _) in zip(scene.regions, outlines, classes, strict=True):
        regions.append(
            {
                "class": name,
                "grade": r.grade,
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
        "label": scene.label,
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


def slide_scene(size: int | None, seed: int, positive: int, options: SlideOptions) -> Scene:
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


SURVIVAL_MEDIAN_MONTHS = 120.0
"""Median survival of a class-0 slide's patient in a ``survival`` cohort; each class up halves it."""
FOLLOW_UP_MONTHS = (12.0, 120.0)
"""Censoring: each patient's follow-up ends at a uniform time in this range (months)."""


def synthetic_survival(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Survival ``time`` (months, 0.1 precision, at least 0.1) and ``event`` (1 observed, 0 censored) of
    slides of classes ``labels``: exponential times with a hazard ratio of 2 per class (proportional
    hazards: a Cox model of the class is the true one), censored at the end of a uniform follow-up. Drawn
    from their own random stream, so the slides are the same with and without survival."""
    rng = np.random.default_rng([seed, 0, 1])  # three words: not the labels', splits' or a slide's stream
    hazard = np.log(2) / SURVIVAL_MEDIAN_MONTHS * 2.0 ** np.asarray(labels, dtype=np.float64)
    death = rng.exponential(1.0 / hazard)
    follow_up = rng.uniform(*FOLLOW_UP_MONTHS, size=len(hazard))
    time = np.maximum(np.round(np.minimum(death, follow_up), 1), 0.1)
    return time, (death <= follow_up).astype(np.int64)


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


def drawn_with() -> dict[str, Any]:
    """What a cohort's bytes depend on besides its options and seed: numpy's SIMD extensions on this CPU
    (:func:`~smt_monai.utils.numpy_simd`: a few slides differ between AVX-512 and AVX2) and the versions of
    the libraries that compute and encode the pixels."""
    import imagecodecs
    import tifffile

    return {
        "numpy": np.__version__,
        "numpy_simd": numpy_simd(),
        "imagecodecs": imagecodecs.__version__,
        "tifffile": tifffile.__version__,
    }


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
    survival: bool = False,
) -> Path:
    """Write a cohort of synthetic slides (see the module docstring for the files).

    Args:
        out_dir: output directory (created if needed).
        num_slides: number of slides.
        size: side of each slide in level-0 px; ``None``: each slide is its tissue plus a glass margin
            (see :func:`make_slide`).
        seed: cohort seed.
        positive_fraction: fraction of slides with tumour (rounded to whole slides), in a binary cohort. A
            graded one (``options.layout.num_classes`` 3 or more) has as many slides of each class, up to one.
        split: training / validation / testing fractions, applied per label.
        options: slide options (defaults if ``None``).
        workers: processes (default: CPU count, at most ``num_slides``; 1 runs in this process). A slide
            of ``SPREAD_SIZE`` px or more a side is rendered by CPU count // workers processes, so one big
            slide uses every core too.
        progress: show a progress bar.
        survival: give each slide a survival ``time`` and ``event`` that depend on its class
            (:func:`synthetic_survival`), in the datalist and ``labels.csv``, for prognosis.

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
    num_classes = options.layout.num_classes
    if num_classes == 2:
        labels = np.zeros(num_slides, dtype=np.int64)
        labels[rng.permutation(num_slides)[: round(num_slides * positive_fraction)]] = 1
    else:
        labels = rng.permutation(num_slides) % num_classes
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
            "positive": int(labels[i]),
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
    times, events = synthetic_survival(labels, seed) if survival else (None, None)
    for i, meta in enumerate(metadata):
        image = Path(meta["image"]).relative_to(out).as_posix()
        annotation = Path(meta["annotation"]).relative_to(out).as_posix()
        meta.update(image=image, annotation=annotation, split=SPLITS[splits[i]])
        entry = {"image": image, "label": int(labels[i]), "annotation": annotation}
        row = [image, int(labels[i]), SPLITS[splits[i]]]
        if times is not None and events is not None:
            entry.update(time=float(times[i]), event=int(events[i]))
            row += [float(times[i]), int(events[i])]
        entries[SPLITS[splits[i]]].append(entry)
        rows.append(row)
    description = (
        "Synthetic H&E-like slides: tumour and benign mimic regions look alike at low magnification and "
        "differ in nuclear detail at level 0."
    )
    if num_classes > 2:
        description += (
            " A slide's grade is that of its worst tumour region, whose share of atypical nuclei rises with "
            "its grade."
        )
    datalist = {
        "name": "smt-monai synthetic cohort",
        "description": description,
        "labels": {str(c): name for c, name in enumerate(label_names(num_classes))},
        "numTraining": len(entries["training"]),
        "numValidation": len(entries["validation"]),
        "numTest": len(entries["testing"]),
        **entries,
    }
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist, indent=2) + "\n")
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "label", "split"] + (["time", "event"] if survival else []))
        writer.writerows(rows)
    cohort = {
        "seed": seed,
        "size": size,
        "mpp": options.mpp,
        "positive_fraction": positive_fraction if num_classes == 2 else None,
        "split": list(split),
        "survival": survival,
        "options": asdict(options),
        "drawn_with": drawn_with(),
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
        "--task",
        choices=tuple(TASKS),
        default="diagnosis",
        help="diagnosis (default): label 1 if the slide holds tumour; grading: label 0 benign or 1 to C - 1, "
        "the grade of the slide's worst tumour region, as many slides of each",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        metavar="C",
        help=f"slide classes: 2 for diagnosis, 3 or more for grading (default: {TASKS['grading']} for "
        "grading)",
    )
    parser.add_argument(
        "--positive-fraction",
        type=float,
        default=0.5,
        help="fraction of tumour slides, for diagnosis (ignored for grading; default: 0.5)",
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
        "them alike at 4 um/px and coarser, so a first layer cannot tell them apart; a tumour point carries "
        f"1 + {TUMOUR_CONTRAST_INK:g}X times a mimic point's ink (1: dark and granular on any thumbnail)",
    )
    parser.add_argument(
        "--survival",
        action="store_true",
        help="give each slide a survival time (months) and event that depend on its class (hazard ratio 2 "
        "per class, censored follow-up), for prognosis: the datalist's time and event keys",
    )
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality (default: 90)")
    parser.add_argument("--border", type=int, default=0, help="black scanner border width in px (default: 0)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def task_classes(task: str, num_classes: int | None) -> int:
    """The number of slide classes of ``task`` (its default if ``None``), or ValueError when it does not
    fit the task."""
    num_classes = TASKS[task] if num_classes is None else num_classes
    if task == "diagnosis" and num_classes != 2:
        raise ValueError(
            f"--task diagnosis has 2 classes, got --num-classes {num_classes} (for more: --task grading)"
        )
    if task == "grading" and num_classes < 3:
        raise ValueError(f"--task grading needs --num-classes 3 or more, got {num_classes}")
    return num_classes


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
                num_classes=task_classes(args.task, args.num_classes),
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
            survival=args.survival,
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
