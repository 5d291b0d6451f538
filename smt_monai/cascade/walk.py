"""The SMT cascade: one walk over the layers, the same in training and at inference (Sec. 3.2, Fig. 2).

Per layer the walk takes the images of the layer's regions (layer 1: the slides' layer-1 views; then the
reads of the boxes the previous layer selected), normalises them once (``normalize_he``), runs the layer,
lets the focus policy rank the patches and select the next layer's regions, and asks the reader for those
boxes. It stops after ``num_layers`` layers (the staged schedule runs fewer in training) or at a layer
without focusing predictor (layer 3).

What training and inference do differently is handed to the walk, not written twice:

- a :class:`LayerRunner` runs a layer on a layer's images. Training (``GradRunner`` in
  :mod:`smt_monai.cascade.training`) runs all the layer's rows in one forward with autograd, optionally
  under random flips with the per-patch outputs mapped back; inference (:class:`ChunkedRunner`) runs chunk by
  chunk under inference mode, so the read of the next chunk overlaps the network and memory does not grow
  with K^2.
- a :class:`Focus` policy ranks the patches and selects. Inference (:class:`TopK`): the top-K by ``q``.
  Training (``TrainingFocus``): also the score bank (Eq. 2), exploration, guidance, the extra benign region
  of weak supervision (Sec. 3.3) and the next layer's labels.

Row layout: a layer's rows are its regions (:class:`Regions`). Layer 1 has one row per field of view of a
slide and selects K patches per slide over all its fields; every later region selects its own K. The
children of one selection are consecutive, in the order of the selection (top-K by decreasing rank value,
then the extra benign region).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import torch

from smt_monai.data.regions import Chunks
from smt_monai.data.tissue import patch_tissue
from smt_monai.focus.score import check_focus_source, class_attention, focusing_score
from smt_monai.focus.selection import Selection, select_regions
from smt_monai.networks.layer import LayerOutput
from smt_monai.networks.normalization import normalize_he

ReadRegions = Callable[[np.ndarray, np.ndarray], Chunks]
"""``(slide_index (M,), boxes (M, 3)) -> chunks``: the reads of a layer's regions (uint8 images)."""


@dataclass
class Regions:
    """The regions one layer reads, one row each.

    Attributes:
        slide: ``(M,)`` index of each region's slide among the slides of the walk.
        boxes: ``(M, 3)`` float64 level-0 boxes ``(x, y, size)``.
        parent: ``(M,)`` row of the region in the previous layer whose patch it is (-1 in layer 1).
        rank: ``(M,)`` position in its parent's selection (0: the highest ranked patch).
        focus: ``(M,)`` the parent's rank value (``q`` by default) of that patch (NaN in layer 1).
        focusable: ``(M,)`` False for the extra benign region, which is never focused further.
    """

    slide: np.ndarray
    boxes: np.ndarray
    parent: np.ndarray
    rank: np.ndarray
    focus: np.ndarray
    focusable: np.ndarray

    @classmethod
    def first(cls, boxes: np.ndarray | torch.Tensor, slide: np.ndarray | None = None) -> Regions:
        """Layer 1's regions: ``boxes`` ``(B, 3)``, region ``b`` of slide ``slide[b]`` (default ``b``)."""
        boxes = np.asarray(torch.as_tensor(boxes).cpu(), dtype=np.float64).reshape(-1, 3)
        count = len(boxes)
        return cls(
            slide=np.arange(count) if slide is None else np.asarray(slide, dtype=np.int64),
            boxes=boxes,
            parent=np.full(count, -1),
            rank=np.zeros(count, dtype=np.int64),
            focus=np.full(count, np.nan),
            focusable=np.ones(count, dtype=bool),
        )

    def __len__(self) -> int:
        return len(self.boxes)

    def children(self, rows: np.ndarray, selection: Selection, ranking: torch.Tensor) -> Regions:
        """The next layer's regions: the patches ``selection`` picked in the regions ``rows`` (whose rank
        values are ``ranking``, ``(len(rows), grid**2)``)."""
        per_group = selection.index.shape[1]
        focus = ranking.detach().float().cpu()[selection.parent, selection.index].reshape(-1)
        parent = rows[selection.parent.reshape(-1).numpy()]
        return Regions(
            slide=self.slide[parent],
            boxes=selection.boxes.reshape(-1, 3).numpy(),
            parent=parent,
            rank=np.tile(np.arange(per_group), len(selection.index)),
            focus=focus.numpy().astype(np.float64),
            focusable=selection.focusable.reshape(-1).numpy(),
        )

    def groups(self, rows: np.ndarray, level: int) -> np.ndarray | None:
        """Selection groups of the regions ``rows``: layer 1 selects per slide over all its fields, the
        later layers per region (``None``)."""
        return self.slide[rows] if level == 1 else None


class LayerRun(NamedTuple):
    """A layer's outputs on all its rows, per-patch values in the regions' own patch order.

    Attributes:
        out: the layer's ``LayerOutput``.
        signals: per-patch values ``(M, grid**2)`` the focus policy asked for: ``"score"``, Eq. 2's
            instantaneous ``g``; ``"attention"``, the class token's first-block attention.
        tissue: ``(M, grid**2)`` bool CPU tensor, the patches that hold tissue (``patch_tissue``): only
            they are focused, and only they enter Eq. 3's normalisation.
    """

    out: LayerOutput
    signals: dict[str, torch.Tensor]
    tissue: torch.Tensor


class LayerRunner(Protocol):
    """Runs one layer on normalised image chunks of ``count`` rows and returns its :class:`LayerRun`."""

    def __call__(
        self, layer: torch.nn.Module, chunks: Iterator[Inputs], count: int, signals: tuple[str, ...]
    ) -> LayerRun: ...


@dataclass
class LayerPass:
    """What the walk did at one layer: the regions, the layer's outputs, and (except at the last layer)
    which of its rows selected, the rank values, and the selection."""

    level: int
    regions: Regions
    run: LayerRun
    rows: np.ndarray | None = None
    ranking: torch.Tensor | None = None
    selection: Selection | None = None


class Focus(Protocol):
    """Ranks a layer's patches and selects the next layer's regions.

    ``signals`` names the per-patch values its runner must compute (see :class:`LayerRun`). ``select`` is
    called at every layer that has a focusing predictor, with ``last`` True at the last layer of the walk;
    it returns the rows that select, their rank values and the selection, or ``None`` (always at ``last``).
    """

    signals: tuple[str, ...]

    def select(
        self, level: int, regions: Regions, run: LayerRun, last: bool
    ) -> tuple[np.ndarray, torch.Tensor, Selection] | None: ...


class Inputs(NamedTuple):
    """A chunk of a layer's input: its rows, the normalised images, and which of their patches hold tissue."""

    rows: np.ndarray
    images: torch.Tensor
    tissue: torch.Tensor


def layer_inputs(chunks: Chunks, device: torch.device, grid: int, focuses: bool = True) -> Iterator[Inputs]:
    """``chunks`` of uint8 images as the layers' input: on ``device``, through ``normalize_he`` (the one
    place where inputs are normalised), with the patches that hold tissue (``patch_tissue``, on the uint8
    images) where the layer ``focuses``; the last layer selects no patch, so there every patch counts."""
    for rows, images in chunks:
        if focuses:  # on the CPU whatever device the images come on (layer 1's come with the batch)
            tissue = patch_tissue(images, grid).cpu()
        else:
            tissue = torch.ones(len(images), grid * grid, dtype=torch.bool)
        yield Inputs(np.asarray(rows), normalize_he(images.to(device, non_blocking=True)), tissue)


def walk(
    model: torch.nn.Module,
    regions: Regions,
    images: Chunks,
    read: ReadRegions,
    run: LayerRunner,
    focus: Focus,
    num_layers: int = 3,
    device: torch.device | str = "cpu",
) -> list[LayerPass]:
    """Walk the cascade from layer 1 down to layer ``num_layers``.

    Args:
        model: an ``SMT`` module (eager or TorchScript) with ``layer1..layer3``.
        regions: layer 1's regions (:meth:`Regions.first`).
        images: uint8 chunks of layer 1's images.
        read: reader of the next layers' regions.
        run: how a layer is run (training or inference).
        focus: how patches are ranked and selected.
        num_layers: layers to run (1-3).
        device: where the network runs.

    Returns:
        One :class:`LayerPass` per layer run.

    Raises:
        ValueError: ``num_layers`` is not 1-3.
    """
    if not 1 <= num_layers <= 3:
        raise ValueError(f"num_layers must be 1, 2 or 3, got {num_layers}")
    device = torch.device(device)
    layers = (model.layer1, model.layer2, model.layer3)
    passes: list[LayerPass] = []
    chunks = images
    for level in range(1, num_layers + 1):
        inputs = layer_inputs(chunks, device, int(model.grid), focuses=level < len(layers))
        layer_run = run(layers[level - 1], inputs, len(regions), focus.signals)
        step = LayerPass(level, regions, layer_run)
        passes.append(step)
        if layer_run.out.q is None:
            break
        chosen = focus.select(level, regions, layer_run, last=level == num_layers)
        if chosen is None:
            break
        step.rows, step.ranking, step.selection = chosen
        regions = regions.children(step.rows, step.selection, step.ranking)
        chunks = read(regions.slide, regions.boxes)
    return passes


class TopK:
    """The focus at inference: the top-K tissue patches of every region by ``source`` (method-notes
    "Selection").

    Args:
        num_focus: ``K``.
        grid: patches per side of a layer input.
        source: ``"q"`` (SMT), ``"score"`` (Eq. 2's ``g``; there is no score bank at inference) or
            ``"attention"`` (class attention), the last two for the paper's Table 2 ablations.
        spread: layer 1's picks never touch each other (``SMTConfig.spread_focus``).
    """

    def __init__(self, num_focus: int, grid: int, source: str = "q", spread: bool = False) -> None:
        self.num_focus = num_focus
        self.grid = grid
        self.spread = spread
        self.source = check_focus_source(source)
        self.signals = () if source == "q" else (source,)

    def select(
        self, level: int, regions: Regions, run: LayerRun, last: bool
    ) -> tuple[np.ndarray, torch.Tensor, Selection] | None:
        if last:
            return None
        ranking = run.out.q if self.source == "q" else run.signals[self.source]
        assert ranking is not None
        rows = np.flatnonzero(regions.focusable)
        ranking = ranking[torch.as_tensor(rows, device=ranking.device)].float().cpu()
        selection = select_regions(
            regions.boxes[rows],
            ranking,
            self.num_focus,
            self.grid,
            group=regions.groups(rows, level),
            valid=run.tissue[torch.as_tensor(rows)],
            spread=self.spread and level == 1,
        )
        return rows, ranking, selection


def patch_signals(out: LayerOutput, signals: tuple[str, ...], retain_graph: bool) -> dict[str, torch.Tensor]:
    """The per-patch values ``signals`` of one forward (see :class:`LayerRun`); empty for a layer without
    focusing predictor."""
    values: dict[str, torch.Tensor] = {}
    if out.q is None:
        return values
    if "score" in signals:
        values["score"] = focusing_score(out.probs, out.attn, retain_graph=retain_graph)
    if "attention" in signals:
        values["attention"] = class_attention(out.attn.detach())
    return values


@dataclass
class ChunkedRunner:
    """Runs a layer at inference, chunk by chunk, collecting every output on the CPU.

    Under ``torch.inference_mode`` (with autograd only when Eq. 2's score is asked for, the ablation that
    ranks by it) and bfloat16 autocast when ``amp``. The seconds spent in the network are added to
    ``timings["compute"]``.
    """

    device: torch.device
    amp: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def __call__(
        self, layer: torch.nn.Module, chunks: Iterator[Inputs], count: int, signals: tuple[str, ...]
    ) -> LayerRun:
        grad = "score" in signals
        pieces: list[tuple[np.ndarray, LayerOutput, dict[str, torch.Tensor], torch.Tensor]] = []
        for rows, x, tissue in chunks:
            start = time.perf_counter()
            with (
                torch.inference_mode(not grad),
                torch.set_grad_enabled(grad),
                torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp),
            ):
                out = layer(x.clone() if grad else x)
                values = patch_signals(out, signals, retain_graph=False)
            out = _kept(out)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings["compute"] = self.timings.get("compute", 0.0) + time.perf_counter() - start
            pieces.append((rows, out, {k: v.detach().float().cpu() for k, v in values.items()}, tissue))
        if not pieces:
            raise ValueError("no regions were read")
        order = torch.as_tensor(np.argsort(np.concatenate([p[0] for p in pieces]), kind="stable"))
        fields = [
            value if value is None or value.numel() == 0 else torch.cat([p[1][i] for p in pieces])[order]
            for i, value in enumerate(pieces[0][1])
        ]
        joined = {k: torch.cat([p[2][k] for p in pieces])[order] for k in pieces[0][2]}
        assert len(order) == count, f"{len(order)} rows run, {count} expected"
        return LayerRun(LayerOutput(*fields), joined, torch.cat([p[3] for p in pieces])[order])


def _kept(out: LayerOutput) -> LayerOutput:
    """``out`` on the CPU in float32, without the per-patch embeddings and the attention matrix, which
    inference does not use (the attention alone is ``heads x (1 + grid**2)**2`` values per region)."""
    cpu = [None if v is None else v.detach().float().cpu() for v in out]
    empty = torch.empty(0)
    return LayerOutput(*cpu)._replace(patch_embeddings=empty, attn=empty)


def timed(chunks: Iterator, timings: dict[str, float], key: str = "read") -> Iterator:
    """``chunks``, adding the seconds spent waiting for each to ``timings[key]``."""
    while True:
        start = time.perf_counter()
        chunk = next(chunks, None)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
        if chunk is None:
            return
        yield chunk
