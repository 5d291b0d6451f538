"""The paper's ablations (Table 2, Figure 3) on the synthetic cohort, through the bundle's switches.

Variants are ``train.yaml`` overrides on top of the benchmark's SMT settings, each trained with several
seeds and evaluated on the testing split (``focus_source`` also decides the evaluation's top-K). The paper's
Table 2, with its focus loss on at both layers (``focus_weight: [1, 1]``): forward losses only
(``lambda_bwd: 0`` switches L_emb and L_ret off) with the top-K by the focusing predictor ``q``, by the score
``S`` or by class attention; forward + ``L_ret`` or + ``L_emb`` alone (``distillation_weight`` /
``recheck_weight: 0``); forward + backward. Then the project's default (no ``L_focus``: ``L_ret`` drives the
focus) and the default without its exploration, its annotation guidance or its training flips. The K
sweep evaluates the default model at K in {1, 2, 4, 8}: accuracy and seconds per slide.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from smt_monai.benchmark.bundle_runs import evaluate, run_dir, train
from smt_monai.benchmark.fixtures import environment, synthetic_cohort

PAPER = {"focus_weight": [1.0, 1.0]}
VARIANTS: dict[str, dict[str, Any]] = {
    "paper: forward only, focus by q": {**PAPER, "lambda_bwd": 0.0},
    "paper: forward only, focus by score S": {**PAPER, "lambda_bwd": 0.0, "focus_source": "score"},
    "paper: forward only, focus by attention": {**PAPER, "lambda_bwd": 0.0, "focus_source": "attention"},
    "paper: forward + L_ret": {**PAPER, "distillation_weight": 0.0},
    "paper: forward + L_emb": {**PAPER, "recheck_weight": 0.0},
    "paper: forward + backward": PAPER,
    "default (no L_focus; L_ret drives the focus)": {},
    "default without exploration": {"explore": 0.0},
    "default without annotation guidance": {"guide": 0.0},
    "default without flips / quarter turns": {"augment": False},
}
"""Ablation name -> ``train.yaml`` overrides."""


def select_variants(patterns: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """The ``VARIANTS`` whose names contain any of ``patterns`` (all of them without patterns).

    Raises:
        ValueError: if no variant matches, listing the names.
    """
    if not patterns:
        return dict(VARIANTS)
    chosen = {name: extra for name, extra in VARIANTS.items() if any(p in name for p in patterns)}
    if not chosen:
        raise ValueError(f"no ablation variant matches {list(patterns)}; the variants: {'; '.join(VARIANTS)}")
    return chosen


METRICS = ("balanced_accuracy", "auc", "focus_hit_rate", "focus_precision", "balanced_accuracy_layer1")


def _summary(values: list[float | None]) -> dict[str, float | None]:
    clean = [v for v in values if v is not None]
    if not clean:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(clean)), "std": float(np.std(clean))}


def benchmark_ablation(
    work_dir: str | Path,
    num_slides: int = 48,
    size: int = 16384,
    seed: int = 0,
    seeds: Sequence[int] = (0, 1, 2),
    ks: Sequence[int] = (1, 2, 4, 8),
    smt_overrides: Mapping[str, Any] | None = None,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train every variant with every seed (runs are reused), evaluate, and sweep K on the default model."""
    work_dir = Path(work_dir)
    base = dict(smt_overrides or {})
    datalist = synthetic_cohort(work_dir, num_slides, size, seed)
    out: dict[str, Any] = {
        "environment": environment(),
        "cohort": str(datalist.parent),
        "num_slides": num_slides,
        "slide_size": size,
        "seeds": list(seeds),
        "smt_overrides": base,
        "variants": {},
    }
    for name, extra in (variants or VARIANTS).items():
        per_seed = []
        for s in seeds:
            overrides = {**base, **extra} if s == 0 else {**base, **extra, "seed": s}
            folder = run_dir(work_dir, datalist, "smt", overrides)
            model = train("train.yaml", datalist, folder / "train", overrides)
            k = int(overrides.get("num_focus", 4))
            evaluation = {**overrides, "num_focus": k}
            per_seed.append(evaluate("evaluate.yaml", datalist, model, folder / f"eval_k{k}", evaluation))
        out["variants"][name] = {
            "overrides": dict(extra),
            **{m: _summary([r.get(m) for r in per_seed]) for m in METRICS},
            "per_seed": per_seed,
        }
    folder = run_dir(work_dir, datalist, "smt", base)
    model = train("train.yaml", datalist, folder / "train", base)
    out["k_sweep"] = []
    for k in ks:
        metrics = evaluate("evaluate.yaml", datalist, model, folder / f"eval_k{k}", {**base, "num_focus": k})
        out["k_sweep"].append(
            {
                "k": k,
                "regions": 1 + k + k * k,
                **{m: metrics.get(m) for m in METRICS},
                "seconds_per_slide": metrics.get("seconds_per_slide"),
            }
        )
    return out
