"""The SMT cascade at inference (Sec. 3.2; method-notes "Selection" and "Prediction").

Per slide: layer 1 on the tissue square, top-K patches by ``q`` (or, for the ablations, by the Eq. 2 score or
the class attention: ``focus_source``), layer 2 on those K regions, top-K of each,
layer 3 on the K^2 regions, and the slide prediction aggregated from layer 3. Exactly 1 + K + K^2 regions are
read. Region reading is the caller's (``RegionSource``), so validation during training and bundle inference
share this code; the network runs in chunks of ``chunk_size`` regions, so memory does not grow with K^2.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from smt_monai.focus.score import check_focus_source, class_attention, focusing_score
from smt_monai.focus.selection import select_regions
from smt_monai.networks.normalization import normalize_he

RegionSource = Callable[[np.ndarray, np.ndarray], Iterator[tuple[np.ndarray, torch.Tensor]]]
"""``(slide_index (M,), boxes (M, 3)) -> iterator of (row indices, uint8 images (n, 3, side, side))``."""

AGGREGATIONS = ("max", "mean")


def aggregate(probs: np.ndarray, mode: str) -> np.ndarray:
    """Slide probabilities from region probabilities ``(n, C)``.

    ``max``: the region with the largest positive mass ``sum_{c>0} p_c`` speaks for the slide (binary
    diagnosis: a slide is positive when any focused region is); ``mean``: the average (multi-class grading).
    """
    if mode == "max":
        return probs[int(np.argmax(probs[:, 1:].sum(axis=1)))]
    if mode == "mean":
        return probs.mean(axis=0)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")


@dataclass
class SlidePrediction:
    """What the cascade saw and concluded for one slide.

    Per layer ``l`` (index ``l - 1``), row ``r`` of the arrays is one region the layer read:
    ``boxes`` level-0 ``(x, y, size)``; ``probs`` the layer's class probabilities; ``focus`` the ``q`` of the
    parent layer's patch that chose it (NaN for layer 1); ``rank`` its rank by ``q`` among its siblings
    (0 = highest); ``parent`` the row of its parent region in the previous layer (-1 for layer 1).
    """

    probs: np.ndarray
    layer_probs: list[np.ndarray]
    boxes: list[np.ndarray] = field(default_factory=list)
    region_probs: list[np.ndarray] = field(default_factory=list)
    focus: list[np.ndarray] = field(default_factory=list)
    rank: list[np.ndarray] = field(default_factory=list)
    parent: list[np.ndarray] = field(default_factory=list)
    focus_map: np.ndarray | None = None

    @property
    def prediction(self) -> int:
        return int(np.argmax(self.probs))


def run_layer(
    layer: torch.nn.Module,
    chunks: Iterator[tuple[np.ndarray, torch.Tensor]],
    count: int,
    device: torch.device,
    amp: bool = False,
    timings: dict[str, float] | None = None,
    focus_source: str = "q",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run one layer over uint8 image chunks; returns ``probs (count, C)`` and the focus values
    ``(count, grid**2)`` (None for a layer without a focusing predictor).

    The focus values are ``q``, or with ``focus_source="attention"`` the class attention, or with
    ``"score"`` the instantaneous Eq. 2 score ``g``, for which the layer runs with autograd on (there is no
    score bank at inference). With ``timings``, the seconds spent in the network are added to
    ``timings["compute"]``.
    """
    probs: torch.Tensor | None = None
    q: torch.Tensor | None = None
    for rows, images in chunks:
        start = time.perf_counter()
        x = normalize_he(images.to(device, non_blocking=True))
        with (
            torch.inference_mode(focus_source != "score"),
            torch.enable_grad() if focus_source == "score" else torch.no_grad(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp),
        ):
            out = layer(x.clone() if focus_source == "score" else x)
            focus = out.q
            if focus is not None and focus_source == "score":
                focus = focusing_score(out.probs, out.attn, retain_graph=False)
            elif focus is not None and focus_source == "attention":
                focus = class_attention(out.attn)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if timings is not None:
            timings["compute"] = timings.get("compute", 0.0) + time.perf_counter() - start
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        if probs is None:
            probs = torch.zeros(count, out.probs.shape[1])
            if focus is not None:
                q = torch.zeros(count, focus.shape[1])
        probs[rows_t] = out.probs.detach().float().cpu()
        if q is not None and focus is not None:
            q[rows_t] = focus.detach().float().cpu()
    assert probs is not None, "no regions were read"
    return probs, q


@torch.inference_mode()
def predict_cascade(
    model: torch.nn.Module,
    layer1_images: torch.Tensor,
    layer1_boxes: np.ndarray,
    read: RegionSource,
    num_focus: int = 4,
    aggregation: str = "max",
    num_layers: int = 3,
    device: torch.device | str = "cpu",
    amp: bool = False,
    timings: dict[str, float] | None = None,
    focus_source: str = "q",
) -> list[SlidePrediction]:
    """Run the cascade on a batch of slides.

    Args:
        model: an ``SMT`` module (eager or TorchScript) with ``layer1..layer3`` and ``grid``.
        layer1_images: ``(B, 3, side, side)`` uint8 layer-1 images.
        layer1_boxes: ``(B, 3)`` their level-0 boxes.
        read: reader of the next layers' regions.
        num_focus: ``K``.
        aggregation: ``max`` or ``mean`` over the last layer's regions.
        num_layers: layers to run (fewer during the staged schedule; the last one run predicts).
        device: where the network runs.
        amp: bfloat16 autocast (``smt_monai.utils.fast_bf16`` says where it pays).
        timings: if given, network seconds are added to ``timings["compute"]``.
        focus_source: what the top-K is taken by: ``"q"`` (SMT), ``"score"`` or ``"attention"`` (the
            ablations; see ``run_layer``). ``focus`` and ``focus_map`` then hold those values.

    Returns:
        One :class:`SlidePrediction` per slide.
    """
    check_focus_source(focus_source)
    device = torch.device(device)
    layers = [model.layer1, model.layer2, model.layer3][:num_layers]
    grid = int(model.grid)
    batch = layer1_images.shape[0]
    slide_index = np.arange(batch)
    boxes = np.asarray(layer1_boxes, dtype=np.float64).reshape(-1, 3)
    chunks: Iterator[tuple[np.ndarray, torch.Tensor]] = iter([(slide_index, layer1_images)])
    per_layer: list[dict[str, np.ndarray]] = []
    focus = np.full(batch, np.nan)
    rank = np.zeros(batch, dtype=np.int64)
    parent = np.full(batch, -1)
    for depth, layer in enumerate(layers):
        probs, q = run_layer(layer, chunks, len(boxes), device, amp, timings, focus_source)
        per_layer.append(
            {
                "slide": slide_index,
                "boxes": boxes,
                "probs": probs.numpy(),
                "focus": focus,
                "rank": rank,
                "parent": parent,
            }
        )
        if depth == len(layers) - 1 or q is None:
            break
        selection = select_regions(boxes, q, num_focus, grid)
        per_layer[-1]["q"] = q.numpy()
        parent = np.repeat(np.arange(len(boxes)), num_focus)
        focus = q.gather(1, selection.index).reshape(-1).numpy()
        rank = np.tile(np.arange(num_focus), len(boxes))
        slide_index = slide_index[parent]
        boxes = selection.boxes.reshape(-1, 3).numpy()
        chunks = read(slide_index, boxes)
    return [_slide_view(per_layer, b, aggregation, grid) for b in range(batch)]


def _slide_view(
    per_layer: list[dict[str, np.ndarray]], b: int, aggregation: str, grid: int
) -> SlidePrediction:
    """Slice slide ``b`` out of the batched per-layer arrays, re-indexing parents to per-slide rows."""
    result = SlidePrediction(probs=np.zeros(0), layer_probs=[])
    previous_rows = np.zeros(0, dtype=np.int64)
    for layer in per_layer:
        rows = np.flatnonzero(layer["slide"] == b)
        lookup = {int(r): i for i, r in enumerate(previous_rows)}
        result.boxes.append(layer["boxes"][rows])
        result.region_probs.append(layer["probs"][rows])
        result.focus.append(layer["focus"][rows])
        result.rank.append(layer["rank"][rows])
        result.parent.append(
            np.array([lookup.get(int(p), -1) for p in layer["parent"][rows]], dtype=np.int64)
        )
        result.layer_probs.append(aggregate(layer["probs"][rows], aggregation))
        previous_rows = rows
    result.probs = result.layer_probs[-1]
    if "q" in per_layer[0]:
        result.focus_map = per_layer[0]["q"][b].reshape(grid, grid)
    return result
