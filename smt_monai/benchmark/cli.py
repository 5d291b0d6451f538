"""``smt-monai benchmark``: ``speed``, ``throughput``, ``accuracy``, ``ablation``, ``report``, ``all`` (the
default), and ``focus-diagnostic``.

Each of the first four writes its figures to ``--json`` (stable keys, see the modules); ``report`` turns the
files into ``docs/benchmarks.md``. ``--quick`` shrinks every size (tiny SMT preset, small slides and
cohort, two epochs, a few ablation variants) so that CI runs all of it in a few minutes; its figures only
show that the code works. ``focus-diagnostic`` says where a trained model's picks land on annotated slides.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from smt_monai.arguments import at_least, device
from smt_monai.benchmark.bundle_runs import parse_overrides
from smt_monai.data.errors import OptionError

QUICK_SMT = {
    "preset": "tiny",
    "grid": 4,
    "patch_size": 16,
    "max_epochs": 2,
    "start_epoch": [1, 1, 2],
    "ramp_epochs": 1,
    "batch_size": 2,
}
"""SMT overrides of ``--quick``: the tiny preset, all layers trained within two epochs."""
QUICK_DENSE = {"max_epochs": 1, "bag_size": 16}
QUICK_VARIANTS = ["paper: forward + backward", "paper + no L_focus", "default - exploration"]
"""The ablation variants of ``--quick``: one of each kind (Table 2, a departure added, one removed)."""
REDRAWN_COHORT = (
    " (a cohort drawn again on a CPU with other SIMD extensions can differ in a few slides: its cohort.json "
    "says what drew it, and NPY_DISABLE_CPU_FEATURES set before numpy loads draws another CPU's slides)"
)
"""Appended when ``--json`` holds results of other slides: the same synth command can draw a few slides
anew on another CPU (:func:`smt_monai.utils.numpy_simd`). Merged results record the machine of their last
run, not the one that drew the cohort, so which extensions to disable is left to cohort.json."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI (figures are meaningless)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench"), help="slides, cohorts, runs")
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--focus", type=at_least(1), nargs="+", default=[4, 8], help="K values (default: 4 8)"
    )


def _speed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slide", default=None, help="time this slide instead of a synthetic one")
    parser.add_argument(
        "--size", type=at_least(256), default=None, help="synthetic slide side (default 60000)"
    )
    parser.add_argument(
        "--sizes", type=at_least(256), nargs="+", default=None, help="size sweep (20k 60k 100k)"
    )
    parser.add_argument("--preset", default=None, help="SMT preset to time (default paper)")
    parser.add_argument("--patch-size", type=at_least(16), default=None, help="dense tile side (default 256)")
    parser.add_argument(
        "--max-tiles", type=at_least(1), default=None, help="dense tiles timed (default 2000)"
    )
    parser.add_argument("--repeats", type=at_least(1), default=None, help="timed runs per figure (default 3)")
    parser.add_argument("--backend", default="auto", choices=["auto", "cucim", "openslide", "tifffile"])
    parser.add_argument("--num-workers", type=at_least(1), default=2, help="reading threads (default 2)")
    parser.add_argument("--device", type=device, default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bfloat16 autocast for SMT and dense (default: on CUDA and on CPUs with native bfloat16)",
    )


def _throughput(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size", type=at_least(256), default=None, help="synthetic slide side (default 60000)"
    )
    parser.add_argument(
        "--num-slides", type=at_least(1), default=None, help="slides in the list (default 16)"
    )
    parser.add_argument("--preset", default=None, help="SMT preset (default paper)")
    parser.add_argument("--device", type=device, default="cpu", help="cpu or cuda")


def _training(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-slides", type=at_least(1), default=None, help="cohort slides (default 48)")
    parser.add_argument(
        "--slide-size", type=at_least(256), default=None, help="cohort slide side (default 16384)"
    )
    parser.add_argument("--cohort-seed", type=int, default=0)
    parser.add_argument(
        "--smt", action="append", metavar="KEY=VALUE", help="train.yaml/evaluate.yaml override (repeatable)"
    )
    parser.add_argument(
        "--smt-config",
        action="append",
        default=[],
        metavar="YAML",
        help="a bundle config merged over train.yaml for every SMT run, e.g. cpu.yaml (repeatable; the "
        "ablation's paper variants merge paper.yaml after it)",
    )
    parser.add_argument(
        "--low-mag-tumour-contrast",
        type=float,
        default=0.0,
        metavar="X",
        help="the cohort's smt-monai synth --low-mag-tumour-contrast (default 0: tumour and mimics alike at "
        "low magnification)",
    )
    parser.add_argument(
        "--dataset-dir",
        type=Path,
        default=None,
        metavar="COHORT",
        help="a cohort of your own (a folder with datalist.json and its slides) instead of a drawn one; "
        "--num-slides, --slide-size, --cohort-seed, --low-mag-tumour-contrast and --extra-test-slides "
        "then do not apply",
    )
    parser.add_argument(
        "--test-datalist",
        type=Path,
        action="append",
        default=[],
        metavar="JSON",
        help="with --dataset-dir: another datalist whose testing split is held out too, e.g. another "
        "scanner's slides (repeatable)",
    )
    parser.add_argument("--dense", action="append", metavar="KEY=VALUE", help="train_dense.yaml override")
    parser.add_argument(
        "--extra-test-slides",
        type=at_least(0),
        default=None,
        help="slides of a second cohort added to the testing split (default 30; quick 0)",
    )
    parser.add_argument(
        "--seeds", type=at_least(0), nargs="+", default=None, help="ablation seeds (default 0 1 2)"
    )
    parser.add_argument(
        "--ks",
        type=at_least(1),
        nargs="*",
        default=[1, 2, 4, 8],
        help="K sweep of the default model (default 1 2 4 8; none: no sweep, the default is not trained)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="ablation variants, by (part of) name; a whole name picks it alone (default: all; quick: 3)",
    )


def _report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument(
        "--notes", type=Path, default=Path("docs/benchmarks/notes.md"), help="hand-written findings to append"
    )
    parser.add_argument(
        "--gpu-speed-json",
        type=Path,
        default=Path("docs/benchmarks/speed_gpu.json"),
        help="scripts/bench_gpu.sh's speed.json from a CUDA machine, kept in the repository",
    )


def _diagnostic(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="a trained model (model.pt or model.ts)")
    parser.add_argument("--datalist", required=True, type=Path, help="datalist with annotations")
    parser.add_argument("--split", default="testing", help="the datalist's split (default: testing)")
    parser.add_argument("--num-focus", type=at_least(1), default=None, help="K (default: the model's)")
    parser.add_argument("--focus-source", default="q", choices=["q", "score", "attention"])
    parser.add_argument(
        "--label-overlap",
        type=float,
        nargs=2,
        default=(0.01, 0.1),
        metavar=("LAYER2", "LAYER3"),
        help="tumour / mimic overlap fraction from which a pick lands on it (default: train.yaml's 0.01 0.1)",
    )
    parser.add_argument("--device", type=device, default="cpu", help="cpu or cuda")


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``benchmark`` subcommands to ``parser`` (for ``smt-monai benchmark``)."""
    sub = parser.add_subparsers(dest="benchmark", required=False)
    for name, parts, help_text in (
        ("speed", (_common, _speed), "time SMT, dense and the I/O floor on one slide; memory per size"),
        (
            "throughput",
            (_common, _throughput),
            "slides per hour: 1 and 2 processes, 1 and 2 slides in flight",
        ),
        ("accuracy", (_common, _training), "SMT against dense on a held-out synthetic split"),
        (
            "ablation",
            (_common, _training),
            "the paper's ablations and the K sweep (merged into an existing --json of the same cohort)",
        ),
        ("report", (_common, _report), "write docs/benchmarks.md from the JSON figures"),
        ("all", (_common, _speed, _training, _report), "run everything, then the report (the default)"),
        (
            "focus-diagnostic",
            (_diagnostic,),
            "where a model's layer-1 and layer-2 picks land (glass, normal tissue, mimic, tumour) against "
            "random picks, on annotated slides",
        ),
    ):
        command = sub.add_parser(name, help=help_text, description=help_text)
        for add in parts:
            add(command)
        if name == "accuracy":
            command.add_argument(
                "--smt-model",
                type=Path,
                default=None,
                metavar="MODEL",
                help="evaluate this trained SMT (model.pt) instead of training one; dense tiles follow its "
                "geometry",
            )
            command.add_argument(
                "--lesion-edges-mm",
                type=float,
                nargs="+",
                default=None,
                metavar="MM",
                help="bins of the recall by largest lesion (greatest dimension, mm; default 0.2 2: isolated "
                "tumour cells, micro- and macrometastases)",
            )
        if name in ("speed", "throughput", "accuracy", "ablation"):
            command.add_argument("--json", type=Path, default=None, help=f"output (default WORK/{name}.json)")
        if name == "focus-diagnostic":
            command.add_argument("--json", type=Path, default=None, help="also write the figures here")
        if name == "report":
            for source in ("speed", "throughput", "accuracy"):
                command.add_argument(f"--{source}-json", type=Path, default=None)
            command.add_argument(
                "--ablation-json", type=Path, nargs="+", default=None, help="one or more ablation results"
            )
    return parser


def _pick(value: Any, quick: bool, quick_value: Any, full_value: Any) -> Any:
    return value if value is not None else (quick_value if quick else full_value)


def _save(data: dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    argv = sys.argv[1:]
    argv = argv[1:] if argv[:1] == ["benchmark"] else argv  # `smt-monai benchmark ...` or the script
    data["command"] = "smt-monai benchmark " + " ".join(shlex.quote(a) for a in argv)
    data["quick"] = bool(getattr(args, "quick", False))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def _run_speed(args: argparse.Namespace, path: Path) -> None:
    from smt_monai.benchmark.speed import benchmark_speed

    q = args.quick
    data = benchmark_speed(
        args.work_dir,
        size=_pick(args.size, q, 2048, 60000),
        slide=args.slide,
        sizes=_pick(args.sizes, q, [1024, 2048], [20000, 60000, 100000]),
        focus=args.focus,
        preset=_pick(args.preset, q, "tiny", "paper"),
        patch_size=_pick(args.patch_size, q, 16, 256),
        max_tiles=_pick(args.max_tiles, q, 256, 2000),
        repeats=_pick(args.repeats, q, 1, 3),
        backend=args.backend,
        num_workers=args.num_workers,
        device=args.device,
        amp=args.amp,
    )
    _save(data, path, args)


def _run_throughput(args: argparse.Namespace, path: Path) -> None:
    from smt_monai.benchmark.throughput import benchmark_throughput

    q = args.quick
    data = benchmark_throughput(
        args.work_dir,
        size=_pick(args.size, q, 2048, 60000),
        num_slides=_pick(args.num_slides, q, 4, 16),
        preset=_pick(args.preset, q, "tiny", "paper"),
        num_focus=args.focus[0],
        device=args.device,
    )
    _save(data, path, args)


def _training_settings(args: argparse.Namespace) -> dict[str, Any]:
    q = args.quick
    return {
        "num_slides": _pick(args.num_slides, q, 8, 48),
        "size": _pick(args.slide_size, q, 1024, 16384),
        "seed": args.cohort_seed,
        "extra_test_slides": _pick(args.extra_test_slides, q, 0, 30),
        "smt_overrides": {**(QUICK_SMT if q else {}), **parse_overrides(args.smt)},
        "smt_overlays": list(args.smt_config),
        "contrast": args.low_mag_tumour_contrast,
        "dataset_dir": args.dataset_dir,
        "test_datalists": list(args.test_datalist),
    }


def _run_accuracy(args: argparse.Namespace, path: Path) -> None:
    from smt_monai.benchmark.accuracy import benchmark_accuracy

    dense = {**(QUICK_DENSE if args.quick else {}), **parse_overrides(args.dense)}
    settings = _training_settings(args)
    model = getattr(args, "smt_model", None)  # `benchmark all` trains its own
    data = benchmark_accuracy(
        args.work_dir,
        focus=args.focus,
        dense_overrides=dense,
        smt_model=model,
        lesion_edges_mm=getattr(args, "lesion_edges_mm", None),
        **settings,
    )
    _save(data, path, args)


def _previous_results(path: Path) -> dict[str, Any] | None:
    """The results a run will merge into (``--json`` already written), or None for a new file.

    Raises:
        OptionError: naming the file, when it is not a results file (unreadable, not a JSON object).
    """
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OptionError(f"{path}: not a benchmark results file ({e}): give another --json") from None
    if not isinstance(data, dict) or not isinstance(data.get("variants", {}), dict):
        raise OptionError(
            f"{path}: not a benchmark results file (no JSON object of results): give another --json"
        )
    return data


def _run_ablation(args: argparse.Namespace, path: Path) -> None:
    from smt_monai.benchmark.ablation import (
        benchmark_ablation,
        differing_runs,
        merge_ablation,
        select_variants,
    )
    from smt_monai.benchmark.accuracy import held_out_cohort

    seeds = _pick(args.seeds, args.quick, [0], [0, 1, 2])
    settings = _training_settings(args)
    selection = select_variants(
        _pick(args.variants, args.quick, QUICK_VARIANTS, None), settings["smt_overlays"]
    )
    previous = _previous_results(path)
    if previous is not None:  # checked before hours of training, whose results could not be merged
        cohort = {k: v for k, v in settings.items() if k not in ("smt_overrides", "smt_overlays")}
        head = {**held_out_cohort(Path(args.work_dir), **cohort)[3], **settings}
        if differing := differing_runs(previous, head):
            raise OptionError(
                f"{path}: holds ablation results of other slides or base configs ({', '.join(differing)} "
                "differ), which cannot merge with this run: give another --json"
                + (REDRAWN_COHORT if "cohort_digest" in differing else "")
            )
    data = benchmark_ablation(args.work_dir, seeds=seeds, ks=args.ks, selection=selection, **settings)
    if previous is not None:
        data = merge_ablation(previous, data)
    _save(data, path, args)


def _run_diagnostic(args: argparse.Namespace) -> int:
    """Print (and with ``--json`` write) where the model's picks land."""
    from smt_monai.benchmark.focus_diagnostic import CATEGORIES, focus_landing_of_model, landing_table

    result = focus_landing_of_model(
        args.model,
        args.datalist,
        args.split,
        label_overlap=args.label_overlap,
        device=args.device,
        num_focus=args.num_focus,
        focus_source=args.focus_source,
    )
    for group in ("positive", "negative"):
        count = result["summary"][group]["slides"]
        print(f"\n{group} slides ({count}), K = {result['num_focus']}: share of each layer's picks")
        print("| layer | picks | " + " | ".join(CATEGORIES) + " |")
        print("|---|---|" + "---:|" * len(CATEGORIES))
        print("\n".join(landing_table(result, group)))
        if group == "positive" and count:
            hit = result["summary"][group]["layer1_hit"]
            print(
                f"layer 1 picked a tumour patch on {hit['model']:.2f} of them; random tissue patches would "
                f"on {hit['random']:.2f}, a focus that cannot tell tumour from mimic at best on "
                f"{hit['mimic_blind']:.2f}"
            )
    failed = [s for s in result["slides"] if "error" in s]
    for slide in failed:
        print(f"skipped {slide['image']}: {slide['error']}")
    if args.json:
        _save(result, args.json, args)
    return 0


def run_benchmark(args: argparse.Namespace) -> int:
    """Run the chosen benchmark subcommand (``all`` when none was given); returns the exit status."""
    import torch

    from smt_monai.benchmark.report import write_report

    command = args.benchmark or "all"
    if command == "focus-diagnostic":
        return _run_diagnostic(args)
    if args.benchmark is None:  # plain ``smt-monai benchmark``: every option at its default
        args = add_benchmark_arguments(argparse.ArgumentParser()).parse_args(["all"])
    if args.threads:
        torch.set_num_threads(args.threads)
    work: Path = args.work_dir
    runners = {
        "speed": _run_speed,
        "throughput": _run_throughput,
        "accuracy": _run_accuracy,
        "ablation": _run_ablation,
    }
    if command in runners:
        runners[command](args, args.json or work / f"{command}.json")
        return 0
    if command == "all":
        for name, runner in runners.items():
            runner(args, work / f"{name}.json")
    sources = {name: getattr(args, f"{name}_json", None) or work / f"{name}.json" for name in runners}
    out = write_report(
        args.out,
        sources["speed"],
        sources["accuracy"],
        sources["ablation"],
        args.notes,
        args.gpu_speed_json,
        sources["throughput"],
    )
    print(f"wrote {out}")
    return 0
