"""Accuracy: SMT (K = 4, 8) against the dense baseline on a held-out synthetic split.

Both are trained through the bundle on the cohort's training split, each keeping the epoch and the decision
threshold its validation split gives (``train.yaml``, ``train_dense.yaml`` at SMT's ``val_interval``), so that
balanced accuracy compares two validated operating points, and evaluated on the
testing split, which neither saw, plus ``extra_test_slides`` slides of a second cohort drawn the same way
(a cohort sets aside only a fifth of its slides for testing, too few to resolve a 2-point difference). SMT's
hyper-parameters are the bundle's (``train.yaml`` and any overlays, e.g. ``cpu.yaml``) plus the overrides
given, so that better defaults in the configs flow into the benchmark.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from smt_monai.benchmark.bundle_runs import bundle_device, config_value, evaluate, run_dir, train
from smt_monai.benchmark.fixtures import environment, synthetic_cohort
from smt_monai.data import load_datalist
from smt_monai.data.errors import OptionError
from smt_monai.inference.model import load_model
from smt_monai.utils import atomic_path

TEST_COHORT_SEED_OFFSET = 1000
"""The extra test slides come from the cohort seed plus this, so that they never repeat a training slide."""

FOCUS_METRICS = tuple(
    f"{name}{chance}"
    for name in ("focus_hit_rate", "focus_top1", "focus_region_precision")
    for chance in ("", "_chance")
)
"""The focus measures of ``metrics.json``, each followed by its chance level."""
SMT_METRICS = ("auc", "balanced_accuracy", "balanced_accuracy_layer1", *FOCUS_METRICS)


def smt_figures(metrics: Mapping[str, Any], k: int) -> dict[str, Any]:
    """The stable report keys of one SMT evaluation at ``K = k``."""
    out = {
        f"{name}_k{k}" if name in FOCUS_METRICS else f"{name}_smt_k{k}": metrics.get(name)
        for name in SMT_METRICS
    }
    out[f"seconds_per_slide_smt_k{k}"] = metrics.get("seconds_per_slide")
    out[f"lesion_recall_smt_k{k}"] = lesion_figures(metrics)
    return out


def lesion_figures(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """An evaluation's recall by lesion size (``smt_monai.handlers.LesionRecall``), as ``{bin: {"recall": r,
    "slides": n}}`` in the order of the bins; empty where ``metrics`` has none."""
    bins = [key.removeprefix("recall_lesion_") for key in metrics if key.startswith("recall_lesion_")]
    return {
        name: {"recall": metrics[f"recall_lesion_{name}"], "slides": metrics.get(f"slides_lesion_{name}")}
        for name in bins
    }


def combined_testing(path: Path, sources: Sequence[Path]) -> Path:
    """``path``, written once: a datalist whose ``testing`` split is those of ``sources`` in order (images and
    annotations as absolute paths, whatever the working directory), with the first source's ``labels``."""
    sources = [Path(source).resolve() for source in sources]
    if not path.exists():
        testing = [
            {key: str(value) if key in ("image", "annotation") else value for key, value in entry.items()}
            for source in sources
            for entry in load_datalist(source, "testing", str(source.parent))
        ]
        labels = json.loads(sources[0].read_text()).get("labels", {})
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"labels": labels, "testing": testing}, indent=1) + "\n")
    return path


def held_out_datalist(
    work_dir: Path, datalist: Path, extra_slides: int, size: int, seed: int, contrast: float = 0.0
) -> Path:
    """A datalist whose ``testing`` split is the cohort's plus ``extra_slides`` slides of a second cohort
    drawn the same way (seed ``seed + TEST_COHORT_SEED_OFFSET``, the same ``contrast``, all of it testing),
    both written once; ``datalist`` itself when ``extra_slides`` is 0."""
    if extra_slides <= 0:
        return datalist
    extra_seed = seed + TEST_COHORT_SEED_OFFSET
    folder = synthetic_cohort(
        work_dir, extra_slides, size, extra_seed, contrast=contrast, split=(0.0, 0.0, 1.0), name="_test"
    ).parent
    combined = folder / f"testing_with_{datalist.parent.name}.json"
    return combined_testing(combined, [datalist, folder / "datalist.json"])


def cohort_digest(datalists: Sequence[Path]) -> str:
    """A fingerprint of the slides ``datalists`` name: every split's entries with each image's file name and
    size in bytes and the entry's other fields (label, survival), folders left out. Two results with one
    digest were computed on the same slides, wherever the cohort lay; a cohort drawn again under the same
    name but with other slides gets another digest (results are merged only under one digest)."""
    digest = hashlib.sha1()
    for datalist in datalists:
        for split, entries in sorted(json.loads(Path(datalist).read_text()).items()):
            if not isinstance(entries, list):
                continue
            for entry in load_datalist(datalist, split, str(Path(datalist).parent), require_label=False):
                image = Path(entry["image"])
                fields = {k: v for k, v in entry.items() if k not in ("image", "annotation")}
                row = [split, image.name, image.stat().st_size, fields]
                digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:12]


def held_out_suffix(extra_slides: int) -> str:
    """Suffix of the evaluation folders of a run evaluated on ``held_out_datalist``, so that figures on
    different held-out sets never reuse each other."""
    return f"_plus{extra_slides}" if extra_slides > 0 else ""


def own_cohort(
    work_dir: Path, dataset_dir: str | os.PathLike, test_datalists: Sequence[str | os.PathLike] = ()
) -> tuple[Path, Path, str, dict[str, Any]]:
    """:func:`held_out_cohort` of a cohort of one's own: ``dataset_dir/datalist.json`` trains and validates;
    its testing split plus those of ``test_datalists`` (e.g. another scanner's slides) are the held-out
    slides, combined once into ``work_dir/held_out``."""
    datalist = Path(dataset_dir) / "datalist.json"
    sources = [Path(p).resolve() for p in test_datalists]
    for path in (datalist, *sources):
        if not path.is_file():
            raise OptionError(f"{path}: no such datalist (a cohort folder holds datalist.json)")
    test_datalist, suffix = datalist, ""
    if sources:
        key = hashlib.sha1("\n".join(map(str, sources)).encode()).hexdigest()[:8]
        name = f"testing_{datalist.parent.name}_with_{key}.json"
        test_datalist = combined_testing(work_dir / "held_out" / name, [datalist, *sources])
        suffix = f"_with{key}"
    splits = json.loads(datalist.read_text())
    record = {
        "cohort": str(datalist.parent),
        "num_slides": sum(len(v) for v in splits.values() if isinstance(v, list)),
        "slide_size": None,
        "test_datalists": [str(p) for p in sources],
        "test_datalist": str(test_datalist),
        "cohort_digest": cohort_digest([datalist, test_datalist]),
    }
    return datalist, test_datalist, suffix, record


def held_out_cohort(
    work_dir: Path,
    num_slides: int,
    size: int,
    seed: int,
    extra_test_slides: int,
    contrast: float = 0.0,
    dataset_dir: str | os.PathLike | None = None,
    test_datalists: Sequence[str | os.PathLike] = (),
) -> tuple[Path, Path, str, dict[str, Any]]:
    """The benchmark cohort's datalist (``contrast``: ``smt-monai synth --low-mag-tumour-contrast``), its
    held-out datalist (``held_out_datalist``), the suffix of the evaluation folders, and the figures that
    describe them (the head of a benchmark's JSON). With ``dataset_dir`` the cohort is that folder's instead
    of a drawn one (:func:`own_cohort`, with ``test_datalists``)."""
    if dataset_dir is not None:
        return own_cohort(work_dir, dataset_dir, test_datalists)
    datalist = synthetic_cohort(work_dir, num_slides, size, seed, contrast=contrast)
    test_datalist = held_out_datalist(work_dir, datalist, extra_test_slides, size, seed, contrast)
    record = {
        "cohort": str(datalist.parent),
        "num_slides": num_slides,
        "slide_size": size,
        "low_mag_tumour_contrast": contrast,
        "extra_test_slides": extra_test_slides,
        "test_datalist": str(test_datalist),
        "cohort_digest": cohort_digest([datalist, test_datalist]),
    }
    return datalist, test_datalist, held_out_suffix(extra_test_slides), record


def benchmark_accuracy(
    work_dir: str | Path,
    num_slides: int = 48,
    size: int = 16384,
    seed: int = 0,
    focus: Sequence[int] = (4, 8),
    smt_overrides: Mapping[str, Any] | None = None,
    dense_overrides: Mapping[str, Any] | None = None,
    extra_test_slides: int = 0,
    smt_overlays: Sequence[str] = (),
    contrast: float = 0.0,
    dataset_dir: str | os.PathLike | None = None,
    test_datalists: Sequence[str | os.PathLike] = (),
    smt_model: str | os.PathLike | None = None,
    lesion_edges_mm: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Train both models once (runs are reused), evaluate them on the held-out slides, return the figures.

    Args:
        work_dir: cohorts and runs go here.
        num_slides, size, seed: the synthetic cohort.
        focus: the K values SMT is evaluated at.
        smt_overrides: ``train.yaml`` / ``evaluate.yaml`` overrides (e.g. ``preset``, ``max_epochs``).
        dense_overrides: ``train_dense.yaml`` / ``evaluate_dense.yaml`` overrides; ``patch_size`` and
            ``val_interval`` default to SMT's, and ``tile_mpp`` to SMT's ``layer3_mpp`` where SMT's geometry
            is physical: dense tiles then see the tissue at the resolution of SMT's finest layer, on any
            scanner.
        extra_test_slides: slides of a second cohort added to the testing split (``held_out_datalist``).
        smt_overlays: configs merged over ``train.yaml`` for SMT (e.g. ``cpu.yaml``).
        contrast: the cohort's ``low_mag_tumour_contrast``.
        dataset_dir, test_datalists: a cohort of one's own instead of a drawn one (:func:`own_cohort`).
        smt_model: a trained SMT model to evaluate instead of training one; its card gives the geometry
            the dense tiles follow.
        lesion_edges_mm: the lesion-size bins of the recall by lesion size (default: ``train.yaml``'s
            ``lesion_edges_mm``, CAMELYON17's pN categories); evaluation only, the trained models are reused.
    """
    work_dir = Path(work_dir)
    smt_overrides = dict(smt_overrides or {})
    configs = ["train.yaml", *smt_overlays]
    geometry = ("patch_size", "geometry", "layer3_mpp")
    if smt_model is not None:
        card = json.loads(load_model(smt_model).card)["network"]
        smt = {key: card[key] for key in geometry}
    else:
        smt = {key: smt_overrides.get(key, config_value(configs, key)) for key in geometry}
    physical = {"tile_mpp": smt["layer3_mpp"]} if smt["geometry"] == "physical" else {}
    dense_overrides = dict(dense_overrides or {})
    dense_epochs = dense_overrides.get("max_epochs", config_value(["train_dense.yaml"], "max_epochs"))
    smt_interval = smt_overrides.get("val_interval", config_value(configs, "val_interval"))
    validation = {"val_interval": min(int(smt_interval), int(dense_epochs))}  # at least one validation
    dense_overrides = {"patch_size": smt["patch_size"], **validation, **physical, **dense_overrides}
    datalist, test_datalist, suffix, record = held_out_cohort(
        work_dir, num_slides, size, seed, extra_test_slides, contrast, dataset_dir, test_datalists
    )
    if smt_model is not None:
        model = Path(smt_model).resolve()
        settings = {"model": str(model), **smt_overrides}
        smt_dir = run_dir(work_dir, datalist, "smt_model", settings, smt_overlays)
    else:
        smt_dir = run_dir(work_dir, datalist, "smt", smt_overrides, smt_overlays)
        model = train(configs, datalist, smt_dir / "train", smt_overrides)
    out: dict[str, Any] = {
        **record,
        "environment": environment(bundle_device(configs, smt_overrides)),
        "smt_model": None if smt_model is None else str(smt_model),  # as given (the run folder: resolved)
        "smt_overlays": list(smt_overlays),
        "smt_overrides": smt_overrides,
        "dense_overrides": dense_overrides,
    }
    lesions: dict[str, Any] = {}
    if lesion_edges_mm is not None:
        lesions["lesion_edges_mm"] = [float(e) for e in lesion_edges_mm]
        suffix += "_lesions" + "_".join(f"{e:g}" for e in lesions["lesion_edges_mm"])
        out["lesion_edges_mm"] = lesions["lesion_edges_mm"]
    for k in focus:
        overrides = {**smt_overrides, "num_focus": k, **lesions}
        evaluated = smt_dir / f"eval_k{k}{suffix}"
        metrics = evaluate([*configs, "evaluate.yaml"], test_datalist, model, evaluated, overrides)
        out.update(smt_figures(metrics, k))
    out["num_test_slides"] = metrics.get("num_slides")
    dense_dir = run_dir(work_dir, datalist, "dense", dense_overrides)
    dense_model = train("train_dense.yaml", datalist, dense_dir / "train", dense_overrides)
    dense = evaluate(
        "evaluate_dense.yaml",
        test_datalist,
        dense_model,
        dense_dir / f"eval{suffix}",
        {**dense_overrides, **lesions},
    )
    out.update(
        balanced_accuracy_dense=dense["balanced_accuracy"],
        auc_dense=dense["auc"],
        seconds_per_slide_dense=dense["seconds_per_slide"],
        lesion_recall_dense=lesion_figures(dense),
    )
    for metric, name in (("balanced_accuracy", "points"), ("auc", "auc_points")):
        smt_value, dense_value = out.get(f"{metric}_smt_k{focus[0]}"), out[f"{metric}_dense"]
        if smt_value is not None and dense_value is not None:
            out[f"dense_minus_smt_{name}_k{focus[0]}"] = 100 * (dense_value - smt_value)
    return out
