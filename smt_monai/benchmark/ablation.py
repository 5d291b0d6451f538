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

from smt_monai.benchmark.accuracy import held_out_cohort
from smt_monai.benchmark.bundle_runs import evaluate, run_dir, train

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
    extra_test_slides: int = 0,
) -> dict[str, Any]:
    """Train every variant with every seed (runs are reused), evaluate, and sweep K on the default model.

    Evaluation is on the cohort's testing split plus ``extra_test_slides`` slides of a second cohort, as in
    the accuracy benchmark (``held_out_datalist``).
    """
    work_dir = Path(work_dir)
    base = dict(smt_overrides or {})
    datalist, test_datalist, suffix, record = held_out_cohort(
        work_dir, num_slides, size, seed, extra_test_slides
    )
    out: dict[str, Any] = {**record, "seeds": list(seeds), "smt_overrides": base, "variants": {}}
    for name, extra in (variants or VARIANTS).items():
        per_seed = []
        for s in seeds:
            overrides = {**base, **extra} if s == 0 else {**base, **extra, "seed": s}
            folder = run_dir(work_dir, datalist, "smt", overrides)
            model = train("train.yaml", datalist, folder / "train", overrides)
            k = int(overrides.get("num_focus", 4))
            evaluation = {**overrides, "num_focus": k}
            evaluated = folder / f"eval_k{k}{suffix}"
            per_seed.append(evaluate("evaluate.yaml", test_datalist, model, evaluated, evaluation))
        out["variants"][name] = {
            "overrides": dict(extra),
            "seeds": list(seeds),
            **{m: _summary([r.get(m) for r in per_seed]) for m in METRICS},
            "per_seed": per_seed,
        }
    folder = run_dir(work_dir, datalist, "smt", base)
    model = train("train.yaml", datalist, folder / "train", base)
    out["k_sweep"] = []
    for k in ks:
        evaluation = {**base, "num_focus": k}
        metrics = evaluate("evaluate.yaml", test_datalist, model, folder / f"eval_k{k}{suffix}", evaluation)
        out["k_sweep"].append(
            {
                "k": k,
                "regions": 1 + k + k * k,
                **{m: metrics.get(m) for m in METRICS},
                "seconds_per_slide": metrics.get("seconds_per_slide"),
            }
        )
    return out


SAME_RUN_KEYS = ("cohort", "num_slides", "slide_size", "extra_test_slides", "smt_overrides")
"""What two ablation results must share for their variants to go in one table."""


def merge_ablation(previous: Mapping[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``current`` plus the variants and K-sweep points of ``previous`` that it did not run.

    Subsets run at different times (``--variants``, ``--seeds``, ``--ks``) so add up to one table: a variant
    or K run again replaces the earlier figures, the rest are kept, each variant with its own seeds. Results
    of another cohort or other base overrides are not merged (``current`` is returned unchanged).
    """
    if any(previous.get(key) != current.get(key) for key in SAME_RUN_KEYS):
        return current
    kept = {
        name: {**entry, "seeds": entry.get("seeds", previous.get("seeds", []))}
        for name, entry in previous.get("variants", {}).items()
        if name not in current["variants"]
    }
    order = list(VARIANTS)
    variants = {**kept, **current["variants"]}
    current["variants"] = dict(
        sorted(variants.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))
    )
    current["seeds"] = sorted({s for entry in current["variants"].values() for s in entry["seeds"]})
    sweep = {p["k"]: p for p in previous.get("k_sweep", [])} | {p["k"]: p for p in current.get("k_sweep", [])}
    current["k_sweep"] = [sweep[k] for k in sorted(sweep)]
    current["merged_commands"] = [
        *previous.get("merged_commands", []),
        *([previous["command"]] if "command" in previous else []),
    ]
    return current
