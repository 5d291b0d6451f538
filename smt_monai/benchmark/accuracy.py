"""Accuracy: SMT (K = 4, 8) against the dense baseline on a held-out synthetic split.

Both are trained through the bundle on the cohort's training split (SMT picks its checkpoint on the
validation split, as ``train.yaml`` does; the dense baseline keeps its last epoch) and evaluated on the
testing split, which neither saw, plus ``extra_test_slides`` slides of a second cohort drawn the same way
(a cohort sets aside only a fifth of its slides for testing, too few to resolve a 2-point difference). SMT's
hyper-parameters are the bundle's defaults plus the overrides given, so that better defaults in
``train.yaml`` flow into the benchmark.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from smt_monai.benchmark.bundle_runs import evaluate, run_dir, train
from smt_monai.benchmark.fixtures import environment, synthetic_cohort
from smt_monai.data import load_datalist
from smt_monai.data.synth import make_cohort
from smt_monai.utils import atomic_path

TEST_COHORT_SEED_OFFSET = 1000
"""The extra test slides come from the cohort seed plus this, so that they never repeat a training slide."""

SMT_METRICS = ("balanced_accuracy", "auc", "focus_hit_rate", "focus_precision", "balanced_accuracy_layer1")


def smt_figures(metrics: Mapping[str, Any], k: int) -> dict[str, Any]:
    """The stable report keys of one SMT evaluation at ``K = k``."""
    names = {"focus_hit_rate": "focus_hit_rate", "focus_precision": "focus_precision"}
    out = {}
    for name in SMT_METRICS:
        key = f"{names[name]}_k{k}" if name in names else f"{name}_smt_k{k}"
        out[key] = metrics.get(name)
    out[f"seconds_per_slide_smt_k{k}"] = metrics.get("seconds_per_slide")
    return out


def held_out_datalist(work_dir: Path, datalist: Path, extra_slides: int, size: int, seed: int) -> Path:
    """A datalist whose ``testing`` split is the cohort's plus ``extra_slides`` slides of a second cohort
    (seed ``seed + TEST_COHORT_SEED_OFFSET``, all of it testing), both written once; ``datalist`` itself
    when ``extra_slides`` is 0."""
    if extra_slides <= 0:
        return datalist
    extra_seed = seed + TEST_COHORT_SEED_OFFSET
    folder = work_dir / f"cohort_{extra_slides}x{size}_seed{extra_seed}_test"
    if not (folder / "cohort.json").exists():
        make_cohort(folder, extra_slides, size, extra_seed, split=(0.0, 0.0, 1.0), progress=False)
    combined = folder / f"testing_with_{datalist.parent.name}.json"
    if not combined.exists():
        testing = [
            {key: str(value) if key in ("image", "annotation") else value for key, value in entry.items()}
            for source in (datalist, folder / "datalist.json")
            for entry in load_datalist(source, "testing", str(source.parent))
        ]
        labels = json.loads(datalist.read_text()).get("labels", {})
        with atomic_path(combined) as tmp:
            tmp.write_text(json.dumps({"labels": labels, "testing": testing}, indent=1) + "\n")
    return combined


def held_out_suffix(extra_slides: int) -> str:
    """Suffix of the evaluation folders of a run evaluated on ``held_out_datalist``, so that figures on
    different held-out sets never reuse each other."""
    return f"_plus{extra_slides}" if extra_slides > 0 else ""


def held_out_cohort(
    work_dir: Path, num_slides: int, size: int, seed: int, extra_test_slides: int
) -> tuple[Path, Path, str, dict[str, Any]]:
    """The benchmark cohort's datalist, its held-out datalist (``held_out_datalist``), the suffix of the
    evaluation folders, and the figures that describe them (the head of a benchmark's JSON)."""
    datalist = synthetic_cohort(work_dir, num_slides, size, seed)
    test_datalist = held_out_datalist(work_dir, datalist, extra_test_slides, size, seed)
    record = {
        "environment": environment(),
        "cohort": str(datalist.parent),
        "num_slides": num_slides,
        "slide_size": size,
        "extra_test_slides": extra_test_slides,
        "test_datalist": str(test_datalist),
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
) -> dict[str, Any]:
    """Train both models once (runs are reused), evaluate them on the held-out slides, return the figures.

    Args:
        work_dir: cohorts and runs go here.
        num_slides, size, seed: the synthetic cohort.
        focus: the K values SMT is evaluated at.
        smt_overrides: ``train.yaml`` / ``evaluate.yaml`` overrides (e.g. ``preset``, ``max_epochs``).
        dense_overrides: ``train_dense.yaml`` / ``evaluate_dense.yaml`` overrides; ``patch_size``
            defaults to SMT's.
        extra_test_slides: slides of a second cohort added to the testing split (``held_out_datalist``).
    """
    work_dir = Path(work_dir)
    smt_overrides = dict(smt_overrides or {})
    dense_overrides = {"patch_size": smt_overrides.get("patch_size", 256), **(dense_overrides or {})}
    datalist, test_datalist, suffix, record = held_out_cohort(
        work_dir, num_slides, size, seed, extra_test_slides
    )
    smt_dir = run_dir(work_dir, datalist, "smt", smt_overrides)
    model = train("train.yaml", datalist, smt_dir / "train", smt_overrides)
    out: dict[str, Any] = {**record, "smt_overrides": smt_overrides, "dense_overrides": dense_overrides}
    for k in focus:
        overrides = {**smt_overrides, "num_focus": k}
        metrics = evaluate("evaluate.yaml", test_datalist, model, smt_dir / f"eval_k{k}{suffix}", overrides)
        out.update(smt_figures(metrics, k))
    out["num_test_slides"] = metrics.get("num_slides")
    dense_dir = run_dir(work_dir, datalist, "dense", dense_overrides)
    dense_model = train("train_dense.yaml", datalist, dense_dir / "train", dense_overrides)
    dense = evaluate(
        "evaluate_dense.yaml", test_datalist, dense_model, dense_dir / f"eval{suffix}", dense_overrides
    )
    out.update(
        balanced_accuracy_dense=dense["balanced_accuracy"],
        auc_dense=dense["auc"],
        seconds_per_slide_dense=dense["seconds_per_slide"],
    )
    if out.get(f"balanced_accuracy_smt_k{focus[0]}") is not None:
        gap = 100 * (out["balanced_accuracy_dense"] - out[f"balanced_accuracy_smt_k{focus[0]}"])
        out[f"dense_minus_smt_points_k{focus[0]}"] = gap
    return out
