"""The tensor logic of one SMT training step over the three-layer cascade (Sec. 3.2, 3.3; Eq. 1-7).

Layer 1 reads the slides' tissue images; its top-K patches by ``q`` (plus, in weak supervision, the patch
of lowest ``S~``) become layer 2's regions, whose top-K become layer 3's. Along the way it updates the
score bank with Eq. 2, computes every term of Eq. 7 and combines them. It does no I/O: the caller passes
``read_regions``, which turns level-0 boxes into normalised images, and optionally ``region_overlap`` for
annotation labels. The caller (the engine) then backpropagates ``losses["total"]`` and steps the optimiser.

Batch layout: layer 1 has ``B`` rows (one per slide); layer 2 ``B * K'`` rows, the ``K'`` regions of slide
``b`` at rows ``b * K' .. b * K' + K' - 1`` (top-K in decreasing ``q``, then the extra benign region);
layer 3 ``B * K * K'`` rows, from layer 2's focusable rows in order. ``K' = K + 1`` with ``extra_benign``,
else ``K``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from smt_monai.data.geometry import child_boxes, region_key
from smt_monai.focus.bank import ScoreBank
from smt_monai.focus.dihedral import random_transforms, restore_patch_order, transform_batch
from smt_monai.focus.score import (
    check_focus_source,
    class_attention,
    focusing_score,
    minmax_normalize,
    positive_mass,
)
from smt_monai.focus.selection import Selection, next_labels, reaches_overlap, select_regions
from smt_monai.networks.layer import LayerOutput

if TYPE_CHECKING:
    from smt_monai.losses.combined import SMTLoss
    from smt_monai.networks.smt import SMT

RegionReader = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(slide_index (M,), boxes (M, 3)) -> (M, 3, side, side)`` normalised images of level-0 boxes."""

RegionOverlap = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(slide_index (M,), boxes (M, 3)) -> (M,)`` tumour-overlap fractions, NaN for unannotated slides."""


class CascadeStep(NamedTuple):
    """Everything one cascade step produced, per active layer (index 0 is layer 1).

    Attributes:
        losses: ``SMTLoss`` output: every computed term of Eq. 7 plus ``"L_V"``, ``"L_F"``, ``"total"``.
        outputs: ``LayerOutput`` of each active layer.
        labels: ``(rows,)`` long labels each layer was trained with.
        slide_index: ``(rows,)`` index into the batch's slides of each row of each layer.
        boxes: ``(rows, 3)`` float64 level-0 boxes of each layer's regions.
        selections: the ``Selection`` each layer but the last made (from its focusable rows).
    """

    losses: dict[str, torch.Tensor]
    outputs: list[LayerOutput]
    labels: list[torch.Tensor]
    slide_index: list[torch.Tensor]
    boxes: list[torch.Tensor]
    selections: list[Selection]


def cascade_step(
    model: SMT,
    images: torch.Tensor,
    boxes: torch.Tensor | np.ndarray,
    labels: torch.Tensor,
    slide_ids: Sequence[str],
    read_regions: RegionReader,
    loss_fn: SMTLoss,
    bank: ScoreBank,
    lambda_fwd: Sequence[float],
    lambda_bwd: Sequence[float],
    num_focus: int = 4,
    num_layers: int = 3,
    extra_benign: bool = True,
    region_overlap: RegionOverlap | None = None,
    label_overlap: float | Sequence[float] = (0.01, 0.1),
    augment: bool = False,
    explore: float = 0.0,
    focus_source: str = "q",
    guide: float = 0.0,
) -> CascadeStep:
    """Run the cascade forward in training and compute the Eq. 7 losses (no backward, no optimiser step).

    Per layer ``l``: ``L_cls[l]`` (Eq. 1) on its labels; for ``l`` = 1, 2, on its focusable rows: Eq. 2
    score ``g``, bank update to ``S``, ``L_focus[l]`` (Eq. 3) against ``S~``; if layer ``l + 1`` is active,
    the selection (top-K by ``q``, plus the lowest-``S~`` patch when ``extra_benign``), next-layer labels
    (``next_labels``), the region read, and once layer ``l + 1`` ran, ``L_ret[l]`` (Eq. 4) and ``L_emb[l]``
    (Eq. 5-6) over the K focused regions (the extra benign region only enters ``L_cls[l + 1]``).

    Args:
        model: the ``SMT`` module (anything with ``layer1..layer3`` and ``grid``), in training mode.
        images: ``(B, 3, side, side)`` normalised layer-1 images.
        boxes: ``(B, 3)`` level-0 boxes of the layer-1 regions.
        labels: ``(B,)`` slide labels.
        slide_ids: ``B`` slide ids (for the score-bank keys).
        read_regions: reader of the next layers' regions (the caller's I/O).
        loss_fn: the ``SMTLoss`` whose term modules and Eq. 7 combination are used.
        bank: score bank of Eq. 2 (updated in place).
        lambda_fwd: ``lambda_fwd`` of layers 1-3 for this step.
        lambda_bwd: ``lambda_bwd`` of layers 1-2 for this step.
        num_focus: ``K``.
        num_layers: active layers (1-3): the staged activation runs only layers up to ``num_layers``.
        extra_benign: add the weak-supervision extra benign region (Sec. 3.3).
        region_overlap: optional annotation overlap of regions, for ``next_labels``.
        label_overlap: tumour-overlap fraction from which a region is positive, for layer 2's and layer 3's
            regions (one value: both). The fraction is of the region's area, so a region ``grid**2`` times
            larger needs a lower one: at 0.1 half of the layer-2 regions that hold tumour on the synthetic
            cohort would be labelled negative, and ``L_ret`` would teach layer 1 to look away from them.
        augment: show every layer its inputs under a random flip / quarter turn
            (``smt_monai.focus.dihedral``); ``q``, the Eq. 2 score and the patch embeddings are mapped
            back to the untransformed patch order, so selection, score bank and losses are unchanged
            (``LayerOutput.attn`` stays as computed).
        explore: probability that a region's K-th pick is a random patch (``select_regions``).
        guide: probability that a region's K-th pick is a patch whose tumour overlap reaches the next
            layer's ``label_overlap`` (``select_regions``; only with ``region_overlap``, on annotated slides).
        focus_source: what the top-K is taken by: ``"q"`` (SMT), ``"score"`` (the bank's ``S``) or
            ``"attention"`` (``class_attention``); ``L_ret`` still teaches ``q`` on the selected patches.

    Returns:
        ``CascadeStep``.

    Raises:
        ValueError: if ``num_layers`` is not 1-3 or the batch sizes disagree.
    """
    if not 1 <= num_layers <= 3:
        raise ValueError(f"num_layers must be 1, 2 or 3, got {num_layers}")
    check_focus_source(focus_source)
    thresholds = (label_overlap,) * 2 if isinstance(label_overlap, (int, float)) else tuple(label_overlap)
    if len(thresholds) != 2:
        raise ValueError(f"label_overlap needs one value or two (layers 2, 3), got {label_overlap}")
    if not images.shape[0] == len(slide_ids) == labels.shape[0]:
        raise ValueError("images, labels and slide_ids must have one entry per slide")
    device = images.device
    layers = (model.layer1, model.layer2, model.layer3)
    slide_labels = labels.to(torch.long).cpu()

    x = images
    y = slide_labels
    slide_index = torch.arange(len(slide_ids))
    region_boxes = torch.as_tensor(boxes, dtype=torch.float64).cpu().reshape(-1, 3)
    focusable = torch.ones(len(slide_ids), dtype=torch.bool)
    terms: dict[str, torch.Tensor] = {}
    step = CascadeStep({}, [], [], [], [], [])
    focus_rows: list[torch.Tensor] = []

    for level in range(1, num_layers + 1):
        transforms = random_transforms(x.shape[0]) if augment else None
        raw = layers[level - 1](x if transforms is None else transform_batch(x, transforms))
        out = _untransformed(raw, transforms, model.grid)
        step.outputs.append(out)
        step.labels.append(y)
        step.slide_index.append(slide_index)
        step.boxes.append(region_boxes)
        terms[f"cls{level}"] = loss_fn.classification[level - 1](out.logits, y)
        if level > 1:
            _backward_terms(
                terms,
                level - 1,
                step.outputs[-2],
                out,
                focus_rows[-1],
                step.selections[-1],
                num_focus,
                loss_fn,
            )
        if out.q is None:
            break

        rows = focusable.nonzero().squeeze(1)
        keys = [
            region_key(slide_ids[i], box)
            for i, box in zip(slide_index[rows].tolist(), region_boxes[rows].numpy(), strict=True)
        ]
        rows_on_device = rows.to(device)
        g = focusing_score(raw.probs, raw.attn)
        if transforms is not None:
            g = restore_patch_order(g, transforms, model.grid)
        score = bank.update(keys, g[rows_on_device])
        q = out.q[rows_on_device]
        terms[f"focus{level}"] = loss_fn.focus(q, score)
        focus_rows.append(rows)
        if level == num_layers:
            break

        benign = minmax_normalize(score) if extra_benign else None
        ranking = q if focus_source == "q" else score
        if focus_source == "attention":
            ranking = class_attention(raw.attn.detach())
            if transforms is not None:
                ranking = restore_patch_order(ranking, transforms, model.grid)
            ranking = ranking[rows_on_device]
        overlap = None
        if region_overlap is not None:
            overlap = _patch_overlap(region_overlap, slide_index[rows], region_boxes[rows], model.grid)
        target = None if overlap is None else reaches_overlap(overlap, thresholds[level - 1])
        selection = select_regions(
            region_boxes[rows], ranking, num_focus, model.grid, benign, explore, guide=guide, target=target
        )
        step.selections.append(selection)
        per_parent = selection.index.shape[1]
        slide_index = slide_index[rows].repeat_interleave(per_parent)
        region_boxes = selection.boxes.reshape(-1, 3)
        if overlap is not None:
            overlap = overlap.gather(1, selection.index)
        parent_labels = slide_labels[slide_index[::per_parent]]
        y = next_labels(parent_labels, selection.focusable, overlap, thresholds[level - 1]).reshape(-1)
        focusable = selection.focusable.reshape(-1)
        x = read_regions(slide_index, region_boxes).to(device)

    return step._replace(losses=loss_fn(terms, lambda_fwd, lambda_bwd))


def _patch_overlap(
    region_overlap: RegionOverlap, slide_index: torch.Tensor, boxes: torch.Tensor, grid: int
) -> torch.Tensor:
    """``(R, grid**2)`` tumour-overlap fractions of every patch of the regions ``boxes`` (NaN: unknown)."""
    patches = torch.arange(grid * grid).expand(len(boxes), -1)
    fractions = region_overlap(
        slide_index.repeat_interleave(grid * grid), child_boxes(boxes, patches, grid).reshape(-1, 3)
    )
    return fractions.reshape(len(boxes), grid * grid)


def _untransformed(out: LayerOutput, transforms: torch.Tensor | None, grid: int) -> LayerOutput:
    """``out`` with ``q`` and the patch embeddings in the patch order of the untransformed inputs."""
    if transforms is None:
        return out
    q = None if out.q is None else restore_patch_order(out.q, transforms, grid)
    return out._replace(q=q, patch_embeddings=restore_patch_order(out.patch_embeddings, transforms, grid))


def _backward_terms(
    terms: dict[str, torch.Tensor],
    level: int,
    parent: LayerOutput,
    child: LayerOutput,
    rows: torch.Tensor,
    selection: Selection,
    num_focus: int,
    loss_fn: SMTLoss,
) -> None:
    """Add ``L_ret[level]`` (Eq. 4) and ``L_emb[level]`` (Eq. 5-6), taught by the next layer's K regions."""
    if parent.q is None:
        raise ValueError(f"layer {level} has no focusing predictor")
    device = parent.q.device
    per_parent = selection.index.shape[1]
    q_selected = parent.q[rows.to(device)].gather(1, selection.index[:, :num_focus].to(device))
    p_next = positive_mass(child.probs).reshape(-1, per_parent)[:, :num_focus]
    terms[f"ret{level}"] = loss_fn.recheck(q_selected, p_next)
    width = child.cls_embedding.shape[-1]
    next_cls = child.cls_embedding.reshape(-1, per_parent, width)[:, :num_focus]
    terms[f"emb{level}"] = loss_fn.distillation(parent.cls_embedding[rows.to(device)], next_cls)
