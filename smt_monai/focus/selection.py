"""Forward focusing (Sec. 3.2) and weak supervision (Sec. 3.3): which patches the next layer magnifies, and
with which labels it trains."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from smt_monai.data.geometry import child_boxes


class Selection(NamedTuple):
    """The regions one layer hands to the next, ``K'`` per selection group.

    Attributes:
        index: ``(G, K')`` long patch indices (row-major) in the parent regions; the top-K by ``q`` first,
            in decreasing ``q`` (``t_1 .. t_K`` of Sec. 3.1), then the extra benign patch if requested.
        parent: ``(G, K')`` long row (among the regions given to ``select_regions``) of each pick's parent.
        boxes: ``(G, K', 3)`` float64 level-0 boxes ``(x, y, size)`` of the next layer's regions.
        focusable: ``(G, K')`` bool, False for the extra benign region, which is never focused further.
    """

    index: torch.Tensor
    parent: torch.Tensor
    boxes: torch.Tensor
    focusable: torch.Tensor


def select_regions(
    parent_boxes: torch.Tensor | np.ndarray,
    q: torch.Tensor,
    num_focus: int,
    grid: int,
    benign_score: torch.Tensor | None = None,
    explore: float = 0.0,
    generator: torch.Generator | None = None,
    guide: float = 0.0,
    target: torch.Tensor | None = None,
    group: np.ndarray | torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    spread: bool = False,
) -> Selection:
    """Top-K patches by the focusing prediction ``q`` (at training and inference), as next-layer regions.

    The top-K is taken per selection group: by default every region is its own group (each layer-2 region
    picks its own K, so layer 3 reads K^2); regions sharing a ``group`` value pick K together over all their
    patches (the several layer-1 fields of one slide, so a slide still costs K + K^2 reads after layer 1).
    Patches marked invalid (``valid`` False: glass, padding beyond the slide) are picked only when a group
    has fewer than K' valid ones, after all valid patches. With ``spread`` the top K skips a valid patch that
    touches an earlier pick (its 8 neighbours, also across the regions of a group), while valid patches
    apart from every pick remain; after them come the skipped ones in order. K picks then cover K places.

    ``L_ret`` (Eq. 4) teaches ``q`` only on the patches the next layer reads, so in training a greedy top-K
    never corrects a patch whose ``q`` is too low, and once the suspicious patches' ``q`` falls below that
    of untaught ones the focus drifts to normal tissue and stays there. With ``explore`` > 0 each group's
    K-th pick is, with that probability, a uniformly drawn valid patch outside its top K - 1 instead
    (epsilon-greedy; same number of reads), which keeps ``q`` calibrated on every kind of patch. Inference
    uses 0.

    ``guide`` does the same with an annotation (``target``: the patches that hold tumour): with that
    probability the K-th pick of a group is drawn from its tumour patches outside the top K - 1, where it
    has any. The cascade has to bootstrap itself, since layer ``l`` learns where to look from layer
    ``l + 1``, which only learns tumour from what layer ``l`` shows it; on annotated slides guidance shows
    the next layers tumour from the first step, so their ``L_ret`` has something to teach. It fades by
    itself: once the tumour patches rank in the top K - 1 there is nothing left to guide to.

    With ``benign_score`` (the normalised score ``S~`` of Eq. 3, in weakly supervised training), one more
    patch is appended per group: the valid one with the lowest ``S~`` among those not picked, magnified as
    an extra benign sample for the next layer only (Sec. 3.3).

    Args:
        parent_boxes: ``(R, 3)`` level-0 boxes of the regions the layer read.
        q: ``(R, grid**2)`` focusing predictions of the layer (or whatever the top-K is taken by).
        num_focus: ``K``, patches magnified per group.
        grid: patches per side of a layer input.
        benign_score: optional ``(R, grid**2)`` normalised scores ``S~``.
        explore: probability that a group's K-th pick is a random patch outside its top K - 1.
        generator: random source of the exploration and guidance.
        guide: probability that a group's K-th pick is one of its ``target`` patches outside its top K - 1
            (where there is one; otherwise ``explore`` decides).
        target: optional ``(R, grid**2)`` bool, the patches guidance draws from.
        group: optional ``(R,)`` selection group of each region (groups in order of first appearance).
        valid: optional ``(R, grid**2)`` bool, the patches that may be focused.
        spread: take the top K among patches that do not touch each other.

    Returns:
        ``Selection`` with ``K' = K`` (or ``K + 1`` with ``benign_score``) regions per group, on the CPU.

    Raises:
        ValueError: if ``K`` (plus the benign patch) exceeds a region's patches or shapes disagree.
    """
    num_patches = grid * grid
    extra = benign_score is not None
    if q.dim() != 2 or q.shape[1] != num_patches:
        raise ValueError(f"expected q of shape (B, {num_patches}), got {tuple(q.shape)}")
    if not 1 <= num_focus <= num_patches - int(extra):
        raise ValueError(f"cannot select {num_focus} patches (+{int(extra)} benign) of {num_patches}")
    for name, value in (("explore", explore), ("guide", guide)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a probability, got {value}")
    for name, mask in (("target", target), ("valid", valid)):
        if mask is not None and mask.shape != q.shape:
            raise ValueError(f"expected {name} of shape {tuple(q.shape)}, got {tuple(mask.shape)}")
    rows = _group_rows(q.shape[0], group)
    flat = _Flat(rows, num_patches)
    score = flat(q.detach().cpu().double(), -math.inf)
    real = flat(torch.ones(q.shape, dtype=torch.bool), False)
    usable = real if valid is None else flat(valid.cpu().bool(), False)
    # valid patches by decreasing q, then the other real ones, padding last (stable sorts)
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    order = order.gather(1, torch.argsort((~usable.gather(1, order)).to(torch.int8), dim=1, stable=True))
    if spread:
        boxes = torch.as_tensor(parent_boxes, dtype=torch.float64).cpu()[flat.rows]
        patches = child_boxes(boxes, torch.arange(num_patches).expand(*flat.rows.shape, num_patches), grid)
        order = _spread(order, patches.reshape(len(rows), -1, 3), usable, num_focus)
    index = order[:, :num_focus].clone()
    rest = order[:, num_focus - 1 :]  # candidates for the K-th pick
    weights = torch.zeros(rest.shape, dtype=torch.float64)
    if explore > 0:
        explored = torch.rand(len(rows), generator=generator) < explore
        weights[explored] = usable.gather(1, rest)[explored].double()
    if target is not None and guide > 0:
        tumour = (flat(target.cpu().bool(), False) & usable).gather(1, rest)
        guided = (torch.rand(len(rows), generator=generator) < guide) & tumour.any(dim=1)
        weights = torch.where(guided[:, None], tumour.double(), weights)
    chosen = weights.sum(dim=1).nonzero().squeeze(1)
    if len(chosen):
        pick = torch.multinomial(weights[chosen], 1, generator=generator)
        index[chosen, num_focus - 1] = rest[chosen].gather(1, pick).squeeze(1)
    focusable = torch.ones(len(rows), num_focus, dtype=torch.bool)
    if benign_score is not None:
        benign = flat(benign_score.detach().cpu().double(), math.inf)
        benign = torch.where(usable, benign, benign + torch.where(real, 1e9, math.inf)).scatter(
            1, index, math.inf
        )
        index = torch.cat([index, benign.argmin(dim=1, keepdim=True)], dim=1)
        focusable = torch.cat([focusable, torch.zeros(len(rows), 1, dtype=torch.bool)], dim=1)
    parent = flat.rows[torch.arange(len(rows))[:, None], index // num_patches]
    patch = index % num_patches
    boxes = torch.as_tensor(parent_boxes, dtype=torch.float64).cpu()[parent]
    return Selection(patch, parent, child_boxes(boxes, patch[..., None], grid)[..., 0, :], focusable)


def _group_rows(count: int, group: np.ndarray | torch.Tensor | None) -> list[np.ndarray]:
    """The rows of each selection group, groups in order of first appearance (each row alone by default)."""
    if group is None:
        return [np.array([r]) for r in range(count)]
    group = np.asarray(torch.as_tensor(group).cpu()).reshape(-1)
    if len(group) != count:
        raise ValueError(f"expected group of length {count}, got {len(group)}")
    first = {g: None for g in group.tolist()}
    return [np.flatnonzero(group == g) for g in first]


def _spread(order: torch.Tensor, boxes: torch.Tensor, usable: torch.Tensor, num_focus: int) -> torch.Tensor:
    """``order`` (``(G, N)`` patch indices by rank) with, per group, the first ``num_focus`` usable patches
    that touch no earlier one first (``boxes`` ``(G, N, 3)``: two patches touch when their centres are
    within 1.5 sides on both axes), then the rest in order."""
    centres = boxes[..., :2] + boxes[..., 2:] / 2
    out = order.clone()
    for g in range(len(order)):
        picked: list[int] = []
        for patch in order[g].tolist():
            if len(picked) == num_focus or not usable[g, patch]:
                break
            near = (centres[g, picked] - centres[g, patch]).abs() < 1.5 * boxes[g, patch, 2]
            if not near.all(dim=1).any():
                picked.append(patch)
        chosen = torch.as_tensor(picked, dtype=order.dtype)
        out[g] = torch.cat([chosen, order[g][~torch.isin(order[g], chosen)]])
    return out


class _Flat:
    """Lays each group's regions side by side: per-row ``(R, N)`` values become ``(G, rows * N)``, padded."""

    def __init__(self, rows: list[np.ndarray], num_patches: int) -> None:
        width = max(len(r) for r in rows)
        self.rows = torch.zeros(len(rows), width, dtype=torch.long)
        for g, members in enumerate(rows):
            self.rows[g, : len(members)] = torch.as_tensor(members)
            self.rows[g, len(members) :] = int(members[0])
        self.counts = [len(r) for r in rows]
        self.num_patches = num_patches

    def __call__(self, values: torch.Tensor, pad: float | bool) -> torch.Tensor:
        out = values[self.rows].reshape(len(self.counts), -1).clone()
        for g, count in enumerate(self.counts):
            out[g, count * self.num_patches :] = pad
        return out


def reaches_overlap(overlap: torch.Tensor, label_overlap: float) -> torch.Tensor:
    """Whether tumour-overlap fractions make a region positive: ``>= label_overlap``, or ``> 0`` at 0
    (False where the overlap is unknown, NaN)."""
    return overlap >= label_overlap if label_overlap > 0 else overlap > 0


def region_class(overlap: torch.Tensor, label_overlap: float) -> torch.Tensor:
    """The class an annotation gives each region: the highest ``c`` such that the classes ``>= c`` cover at
    least ``label_overlap`` of it (0 when tumour does not reach it; unknown, NaN, is 0 too).

    For one positive class this is :func:`reaches_overlap` of the tumour fraction; for grading it is the
    highest class the region overlaps by ``label_overlap``, a small high-grade focus counting with the grades
    above it.

    Args:
        overlap: ``(..., P)`` fractions of each region covered by classes ``1 .. P`` (disjoint, as
            :meth:`~smt_monai.data.annotations.TumourAnnotation.class_overlap` gives them).
    """
    at_least = overlap.flip(-1).cumsum(-1).flip(-1)
    return reaches_overlap(at_least, label_overlap).sum(-1)


def patch_targets(
    slide_labels: torch.Tensor, overlap: torch.Tensor, label_overlap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """What an annotation says of every patch of some regions, as the next layer's label of the region the
    patch would become (:func:`next_labels`): whether it is positive, and whether the annotation knows.

    Args:
        slide_labels: ``(R,)`` long labels of the regions' slides.
        overlap: ``(R, P, C)`` fractions of each patch covered by each positive class, NaN where unknown.
        label_overlap: overlap threshold of a positive region.

    Returns:
        ``(R, P)`` bool positive and ``(R, P)`` bool known.
    """
    known = ~torch.isnan(overlap.cpu()[..., 0])
    labels = next_labels(slide_labels, torch.ones(known.shape, dtype=torch.bool), overlap, label_overlap)
    return (labels > 0) & known, known


def next_labels(
    slide_labels: torch.Tensor,
    focusable: torch.Tensor,
    overlap: torch.Tensor | None = None,
    label_overlap: float = 0.1,
) -> torch.Tensor:
    """Labels of the next layer's regions (Sec. 3.1, 3.3; method-notes "Selection").

    * A region of an annotated slide takes the class its annotation gives it (:func:`region_class`: positive
      when its tumour-overlap fraction reaches ``label_overlap``, ``label_overlap = 0`` meaning any overlap
      > 0; for grading the highest class it overlaps that much), never above the slide label (a region of a
      negative slide is 0 whatever its annotation says).
    * A region of a slide without annotation (``overlap`` is None, or NaN for that region) takes the slide
      label (weak supervision, Sec. 3.3), except the extra benign region, which is labelled 0. Where an
      annotation exists it decides for the extra region too, since it is the ground truth.

    Args:
        slide_labels: ``(B,)`` long slide labels (0 negative).
        focusable: ``(B, K')`` bool from ``Selection.focusable``.
        overlap: optional ``(B, K', P)`` float fractions of each region covered by each positive class, NaN
            where unknown; computed by the caller from the annotation.
        label_overlap: overlap threshold of a positive region.

    Returns:
        ``(B, K')`` long labels.
    """
    slide = slide_labels.to(torch.long).cpu()[:, None].expand(focusable.shape)
    labels = torch.where(focusable.cpu(), slide, torch.zeros_like(slide))
    if overlap is not None:
        overlap = overlap.cpu()
        annotated = torch.minimum(region_class(overlap, label_overlap), slide)
        labels = torch.where(torch.isnan(overlap[..., 0]), labels, annotated)
    return labels
