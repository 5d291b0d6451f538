"""The paper's ablations (Table 2, Figure 3) and the project's departures from the paper, through the bundle.

A variant is a set of config overlays merged over ``train.yaml`` (after the benchmark's base overlays, such
as ``cpu.yaml``) and a set of overrides. Each is trained with several seeds and evaluated on the testing
split (``focus_source`` also decides the evaluation's top-K), where ``focus_diagnostic`` also says where its
picks landed.

- The paper's Table 2, from ``paper.yaml``: forward losses only (``lambda_bwd: 0`` switches ``L_emb`` and
  ``L_ret`` off) with the top-K by the focusing predictor ``q``, by the score ``S`` or by class attention;
  forward + ``L_ret`` or + ``L_emb`` alone (``distillation_weight`` / ``recheck_weight: 0``); forward +
  backward, the paper's method.
- The project's departures from the paper (``DEPARTURES``, each a few config ids): each added alone to
  ``paper.yaml`` with the default's values, and each removed alone from the default with ``paper.yaml``'s.
  The values are read from the configs, so the grid follows them.
- The K sweep evaluates the default model at K in {1, 2, 4, 8}: accuracy and seconds per slide.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from smt_monai.benchmark.accuracy import SMT_METRICS, held_out_cohort
from smt_monai.benchmark.bundle_runs import bundle_device, config_value, evaluate, run_dir, train
from smt_monai.benchmark.fixtures import environment
from smt_monai.benchmark.focus_diagnostic import CATEGORIES, focus_landing_of_model
from smt_monai.data.errors import OptionError
from smt_monai.utils import atomic_path

PAPER = ("paper.yaml",)
DEFAULT = "default"


class Variant(NamedTuple):
    """Configs merged over ``train.yaml`` and the base overlays, then overrides (bundle ids to values)."""

    overlays: tuple[str, ...]
    overrides: dict[str, Any]


TABLE2: dict[str, dict[str, Any]] = {
    "paper: forward only, focus by q": {"lambda_bwd": 0.0},
    "paper: forward only, focus by score S": {"lambda_bwd": 0.0, "focus_source": "score"},
    "paper: forward only, focus by attention": {"lambda_bwd": 0.0, "focus_source": "attention"},
    "paper: forward + L_ret": {"distillation_weight": 0.0},
    "paper: forward + L_emb": {"recheck_weight": 0.0},
    "paper: forward + backward": {},
}
"""The rows of the paper's Table 2: overrides of ``paper.yaml``."""

DEPARTURES: dict[str, tuple[str, ...]] = {
    "AdamW and cosine decay": ("optimizer", "learning_rates", "lr_scheduler"),
    "L_F trains the encoders": ("focus_grad_to_encoder",),
    "annotation guidance": ("guide",),
    "L_ann (q taught every annotated patch)": ("annotation_weight",),
    "layer-1 picks spread apart": ("spread_focus",),
    "exploration": ("explore",),
    "flips / quarter turns": ("augment",),
    "class-balanced L_cls": ("loss#class_balanced",),
    "no L_focus": ("focus_weight",),
    "the base config's layer schedule": ("start_epoch", "ramp_epochs"),
}
"""Where the project's default departs from the paper: the config ids of each departure."""


def variants(base_overlays: Sequence[str] = ()) -> dict[str, Variant]:
    """Every ablation variant over the base overlays, in table order: Table 2, the paper plus each
    departure, the default, the default minus each departure."""
    default = ["train.yaml", *base_overlays]
    paper = [*default, *PAPER]
    out = {name: Variant(PAPER, dict(extra)) for name, extra in TABLE2.items()}
    for name, keys in DEPARTURES.items():
        out[f"paper + {name}"] = Variant(PAPER, {key: config_value(default, key) for key in keys})
    out[DEFAULT] = Variant((), {})
    for name, keys in DEPARTURES.items():
        out[f"default - {name}"] = Variant((), {key: config_value(paper, key) for key in keys})
    return out


def select_variants(
    patterns: Sequence[str] | None = None, base_overlays: Sequence[str] = ()
) -> dict[str, Variant]:
    """The :func:`variants` whose names contain any of ``patterns`` (all of them without patterns); a
    pattern that is a whole name picks that variant alone (``default``, not every ``default - X``).

    Raises:
        OptionError: if no variant matches, listing the names (one line for the CLI).
    """
    every = variants(base_overlays)
    if not patterns:
        return every
    chosen = {
        name: v
        for name, v in every.items()
        if any(p == name or (p not in every and p in name) for p in patterns)
    }
    if not chosen:
        raise OptionError(f"no ablation variant matches {list(patterns)}; the variants: {'; '.join(every)}")
    return chosen


def _summary(values: list[float | None]) -> dict[str, float | None]:
    clean = [v for v in values if v is not None]
    if not clean:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(clean)), "std": float(np.std(clean))}


def _mean_landing(summaries: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The landing fractions of several seeds (``focus_landing``'s ``summary``) averaged."""
    out: dict[str, Any] = {}
    for group in ("positive", "negative"):
        out[group] = {
            layer: {
                who: {c: _summary([s[group][layer][who][c] for s in summaries])["mean"] for c in CATEGORIES}
                for who in ("model", "random")
            }
            for layer in ("layer1", "layer2")
        }
    return out


def _variant_entry(
    overlays: list[str],
    overrides: dict[str, Any],
    seeds: list[int],
    per_seed: list[Mapping[str, Any]],
    landings: list[Mapping[str, Any]],
) -> dict[str, Any]:
    """One variant's figures: mean +- sd over its seeds, with each seed's metrics and landing kept so that
    seeds run at different times add up (:func:`merge_ablation`)."""
    return {
        "overlays": overlays,
        "overrides": overrides,
        "seeds": seeds,
        **{m: _summary([r.get(m) for r in per_seed]) for m in SMT_METRICS},
        "landing": _mean_landing(landings),
        "per_seed": list(per_seed),
        "per_seed_landing": list(landings),
    }


def _merge_seeds(previous: Mapping[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """One variant's seeds of ``previous`` and ``current`` together, ``current``'s figures for a seed run in
    both. An entry without its seeds' landings (recorded before they were kept) is replaced, not merged."""
    if "per_seed_landing" not in previous:
        return current
    runs = {
        seed: (metrics, where)
        for entry in (previous, current)
        for seed, metrics, where in zip(entry["seeds"], entry["per_seed"], entry["per_seed_landing"])
    }
    seeds = sorted(runs)
    return _variant_entry(
        current["overlays"],
        current["overrides"],
        seeds,
        [runs[s][0] for s in seeds],
        [runs[s][1] for s in seeds],
    )


def landing(
    model: Path, datalist: Path, out: Path, configs: Sequence[str], overrides: Mapping[str, Any]
) -> dict:
    """``focus_landing_of_model`` of a trained variant on the testing split, computed once into ``out``."""
    if not out.exists():
        label_overlap = overrides.get("label_overlap", config_value(configs, "label_overlap"))
        result = focus_landing_of_model(
            model,
            datalist,
            label_overlap=label_overlap,
            num_focus=int(overrides.get("num_focus", config_value(configs, "num_focus"))),
            focus_source=overrides.get("focus_source", config_value(configs, "focus_source")),
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
    return json.loads(out.read_text())


def benchmark_ablation(
    work_dir: str | Path,
    num_slides: int = 48,
    size: int = 16384,
    seed: int = 0,
    seeds: Sequence[int] = (0, 1, 2),
    ks: Sequence[int] = (1, 2, 4, 8),
    smt_overrides: Mapping[str, Any] | None = None,
    selection: Mapping[str, Variant] | None = None,
    extra_test_slides: int = 0,
    smt_overlays: Sequence[str] = (),
    contrast: float = 0.0,
    dataset_dir: str | os.PathLike | None = None,
    test_datalists: Sequence[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Train every variant with every seed (runs are reused), evaluate, diagnose its focus, and sweep K on
    the default model (trained only for a sweep: ``ks`` empty runs the chosen variants alone).

    Evaluation is on the cohort's testing split plus ``extra_test_slides`` slides of a second cohort, as in
    the accuracy benchmark (``held_out_datalist``). ``selection`` (default: every variant) is a subset of
    ``variants(smt_overlays)``; ``smt_overlays`` (e.g. ``cpu.yaml``) and ``smt_overrides`` apply to every
    variant, whose own overrides win; ``contrast`` is the cohort's ``low_mag_tumour_contrast``;
    ``dataset_dir`` and ``test_datalists`` a cohort of one's own instead (``own_cohort``).
    """
    work_dir = Path(work_dir)
    base = dict(smt_overrides or {})
    chosen = selection if selection is not None else select_variants(None, smt_overlays)
    datalist, test_datalist, suffix, record = held_out_cohort(
        work_dir, num_slides, size, seed, extra_test_slides, contrast, dataset_dir, test_datalists
    )
    out: dict[str, Any] = {
        **record,
        "environment": environment(bundle_device(["train.yaml", *smt_overlays], base)),
        "seeds": list(seeds),
        "smt_overlays": list(smt_overlays),
        "smt_overrides": base,
        "variants": {},
    }
    for name, (overlays, extra) in chosen.items():
        configs = ["train.yaml", *smt_overlays, *overlays]
        per_seed, landings = [], []
        for s in seeds:
            overrides = {**base, **extra} if s == 0 else {**base, **extra, "seed": s}
            folder = run_dir(work_dir, datalist, "smt", overrides, [*smt_overlays, *overlays])
            model = train(configs, datalist, folder / "train", overrides)
            evaluation = {
                **overrides,
                "num_focus": int(overrides.get("num_focus", config_value(configs, "num_focus"))),
            }
            evaluated = folder / f"eval_k{evaluation['num_focus']}{suffix}"
            per_seed.append(
                evaluate([*configs, "evaluate.yaml"], test_datalist, model, evaluated, evaluation)
            )
            landings.append(
                landing(model, test_datalist, evaluated / "landing.json", configs, evaluation)["summary"]
            )
        out["variants"][name] = _variant_entry(list(overlays), extra, list(seeds), per_seed, landings)
    out["k_sweep"] = []
    if not ks:
        return out
    configs = ["train.yaml", *smt_overlays]
    folder = run_dir(work_dir, datalist, "smt", base, smt_overlays)
    model = train(configs, datalist, folder / "train", base)
    for k in ks:
        evaluation = {**base, "num_focus": k}
        evaluated = folder / f"eval_k{k}{suffix}"
        metrics = evaluate([*configs, "evaluate.yaml"], test_datalist, model, evaluated, evaluation)
        out["k_sweep"].append(
            {
                "k": k,
                "regions": 1 + k + k * k,
                **{m: metrics.get(m) for m in SMT_METRICS},
                "seconds_per_slide": metrics.get("seconds_per_slide"),
            }
        )
    return out


SAME_RUN_KEYS = ("cohort_digest", "smt_overlays", "smt_overrides")
"""What two ablation results must share for their variants to go in one table."""


def differing_runs(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The ``SAME_RUN_KEYS`` on which two ablation results (or their heads) differ: empty when they merge."""
    as_json = json.loads(json.dumps({key: current.get(key) for key in SAME_RUN_KEYS}, default=str))
    return [key for key in SAME_RUN_KEYS if previous.get(key) != as_json[key]]


def merge_ablation(previous: Mapping[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``current`` plus the variants, seeds and K-sweep points of ``previous`` that it did not run.

    Subsets run at different times (``--variants``, ``--seeds``, ``--ks``) so add up to one table: a seed of
    a variant or a K run again replaces the earlier figures, the rest are kept, each variant with its own
    seeds. A variant of ``previous`` is kept only if it is still defined as it was (overlays and
    overrides). Results of other slides (another ``cohort_digest``: another cohort, or the held-out set or the
    cohort's slides changed), other base overlays or other base overrides are not merged (``current`` is
    returned unchanged).
    """
    if differing_runs(previous, current):
        return current
    defined = variants(current.get("smt_overlays", ()))

    def same(name: str, entry: Mapping[str, Any]) -> bool:
        variant = defined.get(name)
        recorded = {"overlays": entry.get("overlays"), "overrides": entry.get("overrides")}
        as_json = {"overlays": list(variant.overlays), "overrides": variant.overrides} if variant else None
        return json.loads(json.dumps(as_json)) == recorded

    kept = {
        name: {**entry, "seeds": entry.get("seeds", previous.get("seeds", []))}
        for name, entry in previous.get("variants", {}).items()
        if same(name, entry)
    }
    order = list(defined)
    merged = {
        **kept,
        **{
            name: _merge_seeds(kept[name], entry) if name in kept else entry
            for name, entry in current["variants"].items()
        },
    }
    current["variants"] = dict(
        sorted(merged.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))
    )
    current["seeds"] = sorted({s for entry in current["variants"].values() for s in entry["seeds"]})
    sweep = {p["k"]: p for p in previous.get("k_sweep", [])} | {p["k"]: p for p in current.get("k_sweep", [])}
    current["k_sweep"] = [sweep[k] for k in sorted(sweep)]
    current["merged_commands"] = [
        *previous.get("merged_commands", []),
        *([previous["command"]] if "command" in previous else []),
    ]
    return current
