"""The cascade at inference: one slide in, its prediction and where the model looked out (method-notes
"Selection" and "Prediction").

:func:`predict_slide` is the one entry point every user of a trained model goes through (the slide-list
predictor, the evaluator, the benchmarks, the Deploy app, the Python API): layer 1 on the slide's layer-1
view, the top-K patches by ``q``, layer 2 on those K regions, the top-K of each, layer 3 on the K^2 regions,
and the slide prediction aggregated from layer 3. Exactly 1 + K + K^2 regions are read. The network runs
chunk by chunk (:class:`~smt_monai.cascade.walk.ChunkedRunner`) while the next chunk is read in a background
thread (``prefetch``), so reads and compute overlap and memory does not grow with K^2.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from smt_monai.cascade.walk import ChunkedRunner, LayerPass, Regions, TopK, timed, walk
from smt_monai.data.errors import OptionError
from smt_monai.data.regions import RegionReader
from smt_monai.utils import prefetch

AGGREGATIONS = ("max", "mean", "learned")
"""How the slide prediction comes from the last layer's regions: :func:`aggregate`'s ``max`` or ``mean`` of
their probabilities, or ``learned``, the model's slide head on their embeddings (``SMTConfig.slide_head``)."""


def aggregate(probs: np.ndarray, mode: str) -> np.ndarray:
    """Slide probabilities from region probabilities ``(n, C)``.

    ``max``: the slide is as far up the classes as its furthest region, ``P(slide >= c) = max_r P(region r
    >= c)`` for every class ``c`` (the maximum of decreasing sequences is decreasing, so these are the
    cumulative probabilities of a distribution). For diagnosis this is the region with the largest P(positive)
    (a slide is positive when any focused region is); for grading, a small high-grade focus grades the slide,
    as a pathologist grades by the worst pattern seen. ``mean``: the average over the regions (the paper's
    choice, which dilutes a small focus among the K^2 regions).
    """
    if mode == "max":
        at_least = probs[:, ::-1].cumsum(axis=1)[:, ::-1].max(axis=0)  # P(slide >= c), c = 0 .. C - 1
        return np.clip(at_least - np.append(at_least[1:], 0.0), 0.0, None)
    if mode == "mean":
        return probs.mean(axis=0)
    raise ValueError(f"aggregation of probabilities must be max or mean, got {mode!r}")


def check_aggregation(model: torch.nn.Module, aggregation: str) -> str:
    """``aggregation`` if ``model`` can aggregate that way; an OptionError (a ValueError) naming the problem
    otherwise."""
    if aggregation not in AGGREGATIONS:
        raise OptionError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if aggregation == "learned" and getattr(model, "slide_head", None) is None:
        raise OptionError("aggregation 'learned' needs a model trained with a slide head (slide_head: true)")
    return aggregation


def check_num_focus(model: torch.nn.Module, num_focus: int) -> int:
    """``num_focus`` (K) if each of ``model``'s regions has that many patches to focus; an OptionError (a
    ValueError) naming the range otherwise."""
    patches = int(model.grid) ** 2
    if isinstance(num_focus, bool) or int(num_focus) != num_focus or not 1 <= num_focus <= patches:
        raise OptionError(
            f"K (num_focus) {num_focus!r}: this model's regions hold {patches} patches ({int(model.grid)} x "
            f"{int(model.grid)}), so K is 1 to {patches}"
        )
    return int(num_focus)


def predicted_classes(probs: np.ndarray, threshold: float) -> np.ndarray:
    """The class of each row of ``probs``: P(positive) against ``threshold`` for two classes, else argmax."""
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(int)
    return probs.argmax(axis=1)


@dataclass
class SlidePrediction:
    """What the cascade saw and concluded for one slide.

    Per layer ``l`` (index ``l - 1``), row ``r`` of the arrays is one region the layer read:
    ``boxes`` level-0 ``(x, y, size)``; ``region_probs`` the layer's class probabilities; ``focus`` the ``q``
    of the parent layer's patch that chose it (NaN for layer 1); ``rank`` its rank by ``q`` among its
    siblings (0 = highest); ``parent`` the row of its parent region in the previous layer (-1 for layer 1).
    ``layer_probs[l]`` is layer ``l``'s own slide prediction (its regions aggregated); ``probs`` is the last
    layer's, SMT's. ``read_s`` and ``compute_s`` are the seconds spent waiting for region reads and in the
    network, ``seconds`` the whole prediction; ``error`` is the reason a slide could not be predicted (then
    only ``path`` is set). ``dimensions`` (level-0 width, height), ``mpp`` (the level-0 um/px the slide was
    read at; None when unknown), ``backend`` and ``fields`` (layer 1's ``(F, side, side, 3)`` uint8 inputs,
    one per field of view) describe the slide; ``read_mpp`` is the resolution of layer 3's reads (the
    model's ``layer3_mpp``, or the scan's where it is coarser; the region's um/px in the tissue geometry);
    ``tissue_mm2`` the area of the tissue found on the thumbnail (0: none found, the whole slide was read).
    ``focus_map`` is ``(F, grid, grid)``, the layer-1 rank values of each field. ``prediction`` is the
    class: for two classes P(positive) against ``threshold``, else the most probable. ``risk`` is the risk
    head's log hazard ratio (``SMTConfig.risk_head``; None without one).
    """

    path: str = ""
    dimensions: tuple[int, int] = (0, 0)
    mpp: float | None = None
    backend: str = ""
    fields: np.ndarray | None = None
    read_mpp: float | None = None
    tissue_mm2: float | None = None
    probs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    layer_probs: list[np.ndarray] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    region_probs: list[np.ndarray] = field(default_factory=list)
    focus: list[np.ndarray] = field(default_factory=list)
    rank: list[np.ndarray] = field(default_factory=list)
    parent: list[np.ndarray] = field(default_factory=list)
    focus_map: np.ndarray | None = None
    read_s: float = 0.0
    compute_s: float = 0.0
    seconds: float = 0.0
    threshold: float = 0.5
    class_names: list[str] = field(default_factory=list)
    risk: float | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def positive(self) -> float:
        """P(positive): the probability of the classes above 0."""
        return float(self.probs[1:].sum())

    @property
    def prediction(self) -> int:
        """The predicted class (see the class docstring)."""
        return int(predicted_classes(self.probs[None], self.threshold)[0])

    @property
    def label(self) -> str:
        """The predicted class's name (``class_names``, else its number)."""
        names = self.class_names or [str(c) for c in range(len(self.probs))]
        return names[self.prediction]

    def regions(self) -> list[dict[str, Any]]:
        """Every region the cascade read, one row each: ``layer``, ``rank``, ``parent`` (row in the previous
        layer), the level-0 box ``x``, ``y``, ``size`` in px and (when the mpp is known) ``x_um``, ``y_um``,
        ``size_um``, the parent's focus value ``q`` (None in layer 1) and the region's ``p_positive``."""
        rows = []
        for layer, boxes in enumerate(self.boxes):
            positive = self.region_probs[layer][:, 1:].sum(axis=1)
            for row, (x, y, size) in enumerate(boxes):
                q = float(self.focus[layer][row])
                entry = {
                    "layer": layer + 1,
                    "rank": int(self.rank[layer][row]),
                    "parent": int(self.parent[layer][row]),
                    "x": float(x),
                    "y": float(y),
                    "size": float(size),
                    "q": None if math.isnan(q) else q,
                    "p_positive": float(positive[row]),
                }
                if self.mpp is not None:
                    um = float(self.mpp)
                    entry.update(x_um=float(x) * um, y_um=float(y) * um, size_um=float(size) * um)
                rows.append(entry)
        return rows


def predict_slide(
    model: torch.nn.Module,
    view: Mapping[str, Any],
    reader: RegionReader,
    num_focus: int = 4,
    aggregation: str = "max",
    focus_source: str = "q",
    num_layers: int = 3,
    device: torch.device | str = "cpu",
    amp: bool = False,
    threshold: float = 0.5,
) -> SlidePrediction:
    """Run the cascade on one slide.

    Args:
        model: an ``SMT`` module (eager or TorchScript) with ``layer1..layer3``, ``grid`` and ``read_size``.
        view: the slide's layer-1 view, as :class:`~smt_monai.data.dataset.LoadLayer1d` makes it: ``path``,
            ``image`` ``(F, 3, read_size, read_size)`` uint8, one per field of view, and their level-0
            ``box`` ``(F, 3)``; ``dimensions``, ``mpp`` and ``backend`` are copied into the prediction.
        reader: reader of the focused regions (at the network's ``read_size``).
        num_focus: ``K``.
        aggregation: ``max`` or ``mean`` over the last layer's regions, or ``learned`` (the model's slide
            head on their embeddings; the earlier layers' own predictions are then their ``max``).
        focus_source: what the top-K is taken by: ``"q"`` (SMT), ``"score"`` or ``"attention"`` (the
            ablations; see :class:`~smt_monai.cascade.walk.TopK`).
        num_layers: layers to run (fewer during the staged schedule; the last one run predicts).
        device: where the network runs.
        amp: bfloat16 autocast (``smt_monai.utils.fast_bf16`` says where it pays).
        threshold: decision threshold on P(positive) of a binary model.

    Raises:
        SlideReadError: a region of the slide could not be read.
    """
    check_aggregation(model, aggregation)
    start = time.perf_counter()
    device = torch.device(device)
    path = str(view["path"])
    image = torch.as_tensor(view["image"])
    images = image.reshape(-1, *image.shape[-3:])
    regions = Regions.first(view["box"], slide=np.zeros(len(images), dtype=np.int64))
    timings: dict[str, float] = {}
    passes = walk(
        model,
        regions,
        iter([(np.arange(len(images)), images)]),
        lambda index, boxes: timed(prefetch(reader.chunks([path], index, boxes)), timings),
        ChunkedRunner(device, amp, timings),
        TopK(num_focus, int(model.grid), focus_source, bool(getattr(model, "spread_focus", False))),
        num_layers,
        device,
    )
    result = _slide_prediction(passes, aggregation, int(model.grid))
    if len(passes) == 3:
        embeddings = passes[-1].run.out.cls_embedding.to(device)
        with torch.inference_mode():
            if aggregation == "learned":
                logits, _ = model.slide_head(embeddings)
                result.probs = result.layer_probs[-1] = torch.softmax(logits.float(), dim=-1)[0].cpu().numpy()
            if getattr(model, "risk_head", None) is not None:
                result.risk = float(model.risk_head(embeddings)[0].float().item())
    mpp = float(view.get("mpp", float("nan")))
    width, height = (int(v) for v in view.get("dimensions", (0, 0)))
    result.path, result.backend, result.dimensions = path, str(view.get("backend", "")), (width, height)
    result.mpp = None if math.isnan(mpp) else mpp
    tissue_mm2 = float(view.get("tissue_mm2", float("nan")))
    result.tissue_mm2 = None if math.isnan(tissue_mm2) else tissue_mm2
    result.fields = images.permute(0, 2, 3, 1).numpy()
    if result.mpp is not None and len(passes) == 3:
        region_mpp = float(np.mean(result.boxes[-1][:, 2])) * result.mpp / int(model.read_size)
        result.read_mpp = max(region_mpp, result.mpp)
    result.read_s, result.compute_s = timings.get("read", 0.0), timings.get("compute", 0.0)
    result.seconds = time.perf_counter() - start
    result.threshold = threshold
    return result


def _slide_prediction(passes: list[LayerPass], aggregation: str, grid: int) -> SlidePrediction:
    """The walk's passes over one slide as a :class:`SlidePrediction`."""
    result = SlidePrediction()
    for step in passes:
        probs = step.run.out.probs.numpy()
        result.boxes.append(step.regions.boxes)
        result.region_probs.append(probs)
        result.focus.append(step.regions.focus)
        result.rank.append(step.regions.rank)
        result.parent.append(step.regions.parent)
        result.layer_probs.append(aggregate(probs, "max" if aggregation == "learned" else aggregation))
    result.probs = result.layer_probs[-1]
    if passes[0].ranking is not None:
        result.focus_map = passes[0].ranking.numpy().reshape(-1, grid, grid)
    return result
