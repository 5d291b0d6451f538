"""Where each layer's picks land: glass, normal tissue, benign mimic or tumour, against random picks.

For a model and annotated slides (``Tumor`` and ``Mimic`` polygons, as ``smt-monai synth`` writes them),
every pick of layer 1 (a layer-2 region) and of layer 2 (a layer-3 region) is put in one category: tumour
when its tumour overlap reaches the next layer's ``label_overlap`` (the region training labels positive),
else mimic when its mimic overlap does, else normal tissue when the patch holds tissue, else glass (tissue
as ``smt_monai.engines.focus_outcome`` judges it on layer 1's images). Beside each layer's fractions stand
those of ``K`` tissue patches picked at random in the same regions (layer 1: the slide's fields; layer 2:
the regions layer 1 picked), computed exactly: a focus that lands on tumour no more often than these has
learnt nothing, one that lands there less often is steered away from it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from smt_monai.cascade.prediction import SlidePrediction
from smt_monai.data.annotations import MIMIC_NAMES, AnnotationOverlap, annotation_classes
from smt_monai.engines.focus_outcome import MIMIC, TUMOUR, SlidePatches, pick_probability
from smt_monai.focus.selection import reaches_overlap
from smt_monai.inference.api import SMTPredictor

CATEGORIES = ("glass", "normal", "mimic", TUMOUR)
"""Where a pick can land, in the order of its code (``patch_categories``)."""


def patch_categories(patches: SlidePatches, level: int, label_overlap: float) -> np.ndarray:
    """The category code (index in ``CATEGORIES``) of every patch of ``level`` (0: layer 1's patches,
    1: layer 2's) of a slide: tumour before mimic before tissue, overlaps counted from ``label_overlap``."""
    codes = np.where(patches.tissue[level], 1, 0)
    codes = np.where(reaches_overlap(patches.overlap[MIMIC][level], label_overlap), 2, codes)
    return np.where(reaches_overlap(patches.overlap[TUMOUR][level], label_overlap), 3, codes)


def _fractions(weights: np.ndarray, codes: np.ndarray) -> dict[str, float]:
    """``{category: share}`` of picks with probabilities ``weights`` on patches of category ``codes``."""
    shares = np.bincount(codes.reshape(-1), weights.reshape(-1), minlength=len(CATEGORIES))
    return {name: float(v) for name, v in zip(CATEGORIES, shares / weights.sum())}


def hit_probability(targets: int, others: int, k: int) -> float:
    """Probability that ``k`` picks drawn at random without repetition from ``targets + others`` patches
    include a target (all of them are picked when there are at most ``k``)."""
    if targets + others <= k:
        return float(targets > 0)
    return 1.0 - math.comb(others, k) / math.comb(targets + others, k)


def slide_landing(
    prediction: SlidePrediction, patches: SlidePatches, num_focus: int, label_overlap: Sequence[float]
) -> dict[str, dict[str, dict[str, float]]]:
    """``{"layer1" | "layer2": {"model" | "random": {category: fraction}}}`` for one slide's ``prediction``
    (at ``num_focus``), with ``label_overlap`` the thresholds of layer-2 and layer-3 regions, and
    ``"layer1_hit"``: whether layer 1 picked a tumour patch (``model``), the probability that random tissue
    patches do (``random``), and that a focus does which tells suspicious tissue (tumour or mimic) from
    normal tissue perfectly and tumour from mimic not at all (``mimic_blind``: its picks drawn among the
    suspicious patches): the best a layer 1 can do where tumour and mimics look alike at its
    magnification."""
    second, third = patches.locate(prediction)
    first_codes = patch_categories(patches, 0, label_overlap[0])
    layer2_codes = patch_categories(patches, 1, label_overlap[1])
    second_codes = layer2_codes[second]
    random_first = pick_probability(patches.tissue[0][None], num_focus)[0]
    random_second = pick_probability(patches.tissue[1][second], num_focus)
    picked = layer2_codes[third[:, 0], third[:, 1]]
    tissue = patches.tissue[0]
    tumour, mimic = int((tissue & (first_codes == 3)).sum()), int((tissue & (first_codes == 2)).sum())
    others = int(tissue.sum()) - tumour
    return {
        "layer1_hit": {
            "model": float((first_codes[second] == 3).any()),
            "random": hit_probability(tumour, others, num_focus),
            "mimic_blind": hit_probability(tumour, mimic, num_focus),
        },
        "layer1": {
            "model": _fractions(np.ones(len(second)), first_codes[second]),
            "random": _fractions(random_first, first_codes),
        },
        "layer2": {
            "model": _fractions(np.ones(len(picked)), picked),
            "random": _fractions(random_second, second_codes),
        },
    }


def _mean(slides: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-slide fractions of ``slides`` averaged, with their count."""
    out: dict[str, Any] = {"slides": len(slides)}
    for layer in ("layer1", "layer2"):
        out[layer] = {
            who: {
                c: float(np.mean([s[layer][who][c] for s in slides])) if slides else None for c in CATEGORIES
            }
            for who in ("model", "random")
        }
    out["layer1_hit"] = {
        who: float(np.mean([s["layer1_hit"][who] for s in slides])) if slides else None
        for who in ("model", "random", "mimic_blind")
    }
    return out


def focus_landing(
    predictor: SMTPredictor,
    entries: Sequence[Mapping[str, Any]],
    label_overlap: Sequence[float] = (0.01, 0.1),
) -> dict[str, Any]:
    """Where ``predictor``'s picks land on the annotated slides of ``entries`` (datalist items with
    ``image``, ``label`` and ``annotation``; the others are skipped), per slide and averaged over the
    positive, the negative and all slides. A slide that cannot be read is listed with its ``error``."""
    grid = int(predictor.network.grid)
    overlaps = {
        TUMOUR: AnnotationOverlap(annotation_classes(predictor.class_names)),
        MIMIC: AnnotationOverlap(MIMIC_NAMES),
    }
    annotated = [e for e in entries if e.get("annotation")]
    slides: list[dict[str, Any]] = []
    for entry, prediction in zip(annotated, predictor.predict_many([e["image"] for e in annotated])):
        record: dict[str, Any] = {"image": str(entry["image"]), "label": int(entry["label"])}
        if prediction.error:
            slides.append({**record, "error": prediction.error})
            continue
        assert prediction.fields is not None
        annotations = {name: o.annotation(str(entry["annotation"])) for name, o in overlaps.items()}
        patches = SlidePatches.of(prediction.fields, prediction.boxes[0], grid, annotations)
        slides.append({**record, **slide_landing(prediction, patches, predictor.num_focus, label_overlap)})
    done = [s for s in slides if "error" not in s]
    return {
        "num_focus": predictor.num_focus,
        "focus_source": predictor.focus_source,
        "label_overlap": list(label_overlap),
        "summary": {
            "positive": _mean([s for s in done if s["label"] > 0]),
            "negative": _mean([s for s in done if s["label"] <= 0]),
            "all": _mean(done),
        },
        "slides": slides,
    }


def focus_landing_of_model(
    model: str | os.PathLike,
    datalist: str | os.PathLike,
    split: str = "testing",
    label_overlap: Sequence[float] = (0.01, 0.1),
    device: str = "cpu",
    **options: Any,
) -> dict[str, Any]:
    """:func:`focus_landing` of the model file ``model`` on the ``split`` of ``datalist``; ``options`` go to
    ``SMTPredictor`` (``num_focus``, ``focus_source``, ``backend``, ``num_workers``, ...)."""
    from smt_monai.data import load_datalist

    datalist = Path(datalist)
    entries = load_datalist(datalist, split, str(datalist.parent))
    predictor = SMTPredictor.from_checkpoint(model, device, **options)
    try:
        result = focus_landing(predictor, entries, label_overlap)
    finally:
        predictor.close()
    return {"model": str(model), "datalist": str(datalist), "split": split, **result}


def landing_table(landing: Mapping[str, Any], group: str = "positive") -> list[str]:
    """Markdown rows ``| layer | who | glass | normal | mimic | tumour |`` of one group's averages."""
    summary = landing["summary"][group]
    rows = []
    for layer in ("layer1", "layer2"):
        for who in ("model", "random"):
            values = summary[layer][who]
            cells = " | ".join("n/a" if values[c] is None else f"{values[c]:.2f}" for c in CATEGORIES)
            rows.append(f"| {layer[-1]} | {who} | {cells} |")
    return rows
