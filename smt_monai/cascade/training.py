"""The cascade in training: the walk with autograd, the score bank, weak supervision and the Eq. 7 losses.

One training step walks the cascade (:func:`smt_monai.cascade.walk.walk`) with

- :class:`GradRunner`: every row of a layer in one forward with autograd (the losses need the graph), under
  a random flip / quarter turn per row when ``augment`` (``smt_monai.focus.dihedral``), the per-patch outputs
  mapped back to the regions' patch order;
- :class:`TrainingFocus`: the Eq. 2 score bank update of every focusable region, the top-K by ``q`` (or by
  the bank's ``S`` or class attention: ``focus_source``) with the K-th pick explored or guided, the extra
  benign region of weak supervision (Sec. 3.3), and the next layer's labels (``next_labels``);

and then combines the terms of Eq. 7. Row layout as in the walk: layer 1 has one row per slide; layer 2
``K'`` rows per slide (top-K in decreasing rank value, then the extra benign region; ``K' = K + 1`` with
``extra_benign``); layer 3 ``K'`` rows per focusable layer-2 row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from smt_monai.cascade.walk import Inputs, LayerPass, LayerRun, ReadRegions, Regions, patch_signals, walk
from smt_monai.data.geometry import child_boxes, region_key
from smt_monai.focus.bank import ScoreBank
from smt_monai.focus.dihedral import random_transforms, restore_patch_order, transform_batch
from smt_monai.focus.score import check_focus_source, minmax_normalize, positive_mass
from smt_monai.focus.selection import Selection, next_labels, patch_targets, reaches_overlap, select_regions
from smt_monai.losses.combined import SMTLoss
from smt_monai.losses.survival import cox_partial_likelihood
from smt_monai.networks.layer import LayerOutput

RegionOverlap = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(slide_index (M,), boxes (M, 3)) -> (M, P)`` fractions covered by each positive class (tumour, or the
grades), NaN for unannotated slides (``AnnotationOverlap``)."""


@dataclass
class GradRunner:
    """Runs a layer in training: all rows in one forward with autograd, optionally under random flips.

    Args:
        grid: patches per side of a layer input.
        augment: show every row under a random flip / quarter turn; ``q``, the patch embeddings and the
            per-patch signals are mapped back to the untransformed patch order (``LayerOutput.attn`` stays as
            computed).
    """

    grid: int
    augment: bool = False

    def __call__(
        self, layer: torch.nn.Module, chunks: Iterator[Inputs], count: int, signals: tuple[str, ...]
    ) -> LayerRun:
        x: torch.Tensor | None = None
        tissue = torch.zeros(count, self.grid**2, dtype=torch.bool)
        for rows, images, patches in chunks:
            if x is None:
                x = images.new_empty(count, *images.shape[1:])
            x[torch.as_tensor(rows, device=images.device)] = images
            tissue[torch.as_tensor(rows)] = patches
        assert x is not None, "no regions were read"
        transforms = random_transforms(count) if self.augment else None
        raw = layer(x if transforms is None else transform_batch(x, transforms))
        values = patch_signals(raw, signals, retain_graph=True)
        if transforms is None:
            return LayerRun(raw, values, tissue)
        restore = lambda v: restore_patch_order(v, transforms, self.grid)  # noqa: E731
        out = raw._replace(
            q=None if raw.q is None else restore(raw.q), patch_embeddings=restore(raw.patch_embeddings)
        )
        return LayerRun(out, {name: restore(v) for name, v in values.items()}, tissue)


class TrainingFocus:
    """The focus of a training walk: score bank, selection with exploration / guidance / extra benign region,
    and next-layer labels. Made afresh for every step; it keeps what the losses need.

    Args:
        grid: patches per side of a layer input.
        bank: the Eq. 2 score bank (updated in place).
        slide_ids: one id per slide of the step (for the bank's region keys).
        labels: ``(B,)`` slide labels.
        field_labels: ``(F,)`` labels of the layer-1 regions (default: their slides' labels).
        num_focus: ``K``.
        focus_source: what the top-K is taken by: ``"q"`` (SMT), ``"score"`` (the bank's ``S``) or
            ``"attention"`` (class attention); ``L_ret`` still teaches ``q`` on the selected patches.
        extra_benign: add the weak-supervision extra benign region (the lowest ``S~`` patch, Sec. 3.3).
        explore: probability that a region's K-th pick is a random patch (``select_regions``).
        guide: probability that a region's K-th pick is a patch whose tumour overlap reaches the next layer's
            ``label_overlap`` (``select_regions``; only with ``overlap``, on annotated slides).
        overlap: annotation overlap of regions, for guidance and ``next_labels``.
        label_overlap: tumour-overlap fractions from which a layer-2 and a layer-3 region is positive.
        spread: layer 1's picks never touch each other (``SMTConfig.spread_focus``).

    Attributes:
        labels: the labels of each layer's rows (layer 1: the slide labels).
        scores: per layer with a focusing predictor, the focusable rows, their ``S`` after the update and
            their tissue patches.
        annotated: per layer that selected with ``overlap``, the focusable rows, whether the annotation makes
            each patch positive and the patches it teaches (tissue the annotation knows), for ``L_ann``.
    """

    def __init__(
        self,
        grid: int,
        bank: ScoreBank,
        slide_ids: Sequence[str],
        labels: torch.Tensor,
        field_labels: torch.Tensor | None = None,
        num_focus: int = 4,
        focus_source: str = "q",
        extra_benign: bool = True,
        explore: float = 0.0,
        guide: float = 0.0,
        overlap: RegionOverlap | None = None,
        label_overlap: tuple[float, float] = (0.01, 0.1),
        spread: bool = False,
    ) -> None:
        self.grid = grid
        self.spread = spread
        self.bank = bank
        self.slide_ids = list(slide_ids)
        self.num_focus = num_focus
        self.focus_source = check_focus_source(focus_source)
        self.extra_benign = extra_benign
        self.explore = explore
        self.guide = guide
        self.overlap = overlap
        self.label_overlap = label_overlap
        self.signals = ("score", "attention") if focus_source == "attention" else ("score",)
        self.slide_labels = labels.to(torch.long).cpu()
        first = self.slide_labels if field_labels is None else field_labels.to(torch.long).cpu()
        self.labels: list[torch.Tensor] = [first]
        self.scores: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []
        self.annotated: dict[int, tuple[np.ndarray, torch.Tensor, torch.Tensor]] = {}

    def select(
        self, level: int, regions: Regions, run: LayerRun, last: bool
    ) -> tuple[np.ndarray, torch.Tensor, Selection] | None:
        rows = np.flatnonzero(regions.focusable)
        on_device = torch.as_tensor(rows, device=run.out.logits.device)
        ids = [self.slide_ids[s] for s in regions.slide[rows]]
        keys = [region_key(slide_id, box) for slide_id, box in zip(ids, regions.boxes[rows])]
        score = self.bank.update(keys, run.signals["score"][on_device])
        tissue = run.tissue[torch.as_tensor(rows)]
        self.scores.append((rows, score, tissue))
        if last:
            return None
        if self.focus_source == "q":
            assert run.out.q is not None
            ranking = run.out.q[on_device]
        else:
            ranking = score if self.focus_source == "score" else run.signals["attention"][on_device]
        overlap = None if self.overlap is None else self._patch_overlap(regions, rows)
        threshold = self.label_overlap[level - 1]
        selection = select_regions(
            regions.boxes[rows],
            ranking,
            self.num_focus,
            self.grid,
            minmax_normalize(score, tissue) if self.extra_benign else None,
            self.explore,
            guide=self.guide,
            target=None if overlap is None else reaches_overlap(overlap.sum(-1), threshold),
            group=regions.groups(rows, level),
            valid=tissue,
            spread=self.spread and level == 1,
        )
        slide_labels = self.slide_labels[torch.as_tensor(regions.slide[rows[selection.parent[:, 0].numpy()]])]
        if overlap is not None:
            positive, known = patch_targets(
                self.slide_labels[torch.as_tensor(regions.slide[rows])], overlap, threshold
            )
            self.annotated[level] = (rows, positive, known & tissue)
        picked = None if overlap is None else overlap[selection.parent, selection.index]
        self.labels.append(next_labels(slide_labels, selection.focusable, picked, threshold).reshape(-1))
        return rows, ranking, selection

    def _patch_overlap(self, regions: Regions, rows: np.ndarray) -> torch.Tensor:
        """``(R, grid**2, P)`` class-overlap fractions of every patch of the regions ``rows`` (NaN:
        unknown)."""
        assert self.overlap is not None
        patches = np.broadcast_to(np.arange(self.grid**2), (len(rows), self.grid**2))
        boxes = child_boxes(regions.boxes[rows], patches, self.grid).reshape(-1, 3)
        fractions = self.overlap(np.repeat(regions.slide[rows], self.grid**2), boxes)
        return torch.as_tensor(fractions).reshape(len(rows), self.grid**2, -1)


class CascadeStep(NamedTuple):
    """Everything one training step's walk produced.

    Attributes:
        losses: ``SMTLoss`` output: every computed term of Eq. 7 plus ``"L_V"``, ``"L_F"``, ``"total"``.
        passes: the walk's :class:`~smt_monai.cascade.walk.LayerPass` of each active layer.
        labels: ``(rows,)`` long labels each layer was trained with.
    """

    losses: dict[str, torch.Tensor]
    passes: list[LayerPass]
    labels: list[torch.Tensor]


class CascadeTraining:
    """One SMT training step over the cascade: the walk and the Eq. 7 losses (no backward, no optimiser step).

    Per layer ``l``: ``L_cls[l]`` (Eq. 1) on its labels; for ``l`` = 1, 2, on its focusable rows,
    ``L_focus[l]`` (Eq. 3) of ``q`` against the bank's normalised ``S``; once layer ``l + 1`` ran,
    ``L_ret[l]`` (Eq. 4) and ``L_emb[l]`` (Eq. 5-6) over the K focused regions (the extra benign region only
    enters ``L_cls[l + 1]``); with annotations, ``L_ann[l]``: Eq. 4's divergence of ``q`` from the label the
    annotation gives the region each tissue patch would become, on every tissue patch of the rows that
    selected. ``L_ret`` teaches ``q`` on the K patches read, about 5 per region, so ``q`` learns little of
    the normal tissue that fills a large specimen and can rank it above the tumour (bundle/docs/README.md
    gives the measurement); where the annotation is known, every patch has its answer without a read.

    Args:
        loss_fn: the ``SMTLoss`` whose term modules and Eq. 7 combination are used.
        bank: score bank of Eq. 2.
        num_focus: ``K``.
        extra_benign, explore, guide, focus_source: as :class:`TrainingFocus`.
        label_overlap: tumour-overlap fraction from which a region is positive, for layer 2's and layer 3's
            regions (one value: both). The fraction is of the region's area, so a region ``grid**2`` times
            larger needs a lower one: at 0.1 half of the layer-2 regions that hold tumour on the synthetic
            cohort would be labelled negative, and ``L_ret`` would teach layer 1 to look away from them.
        augment: random flips / quarter turns of every layer's inputs (:class:`GradRunner`).

    Raises:
        ValueError: ``label_overlap`` has neither one nor two values, or an unknown ``focus_source``.
    """

    def __init__(
        self,
        loss_fn: SMTLoss,
        bank: ScoreBank,
        num_focus: int = 4,
        extra_benign: bool = True,
        label_overlap: float | Sequence[float] = (0.01, 0.1),
        augment: bool = False,
        explore: float = 0.0,
        guide: float = 0.0,
        focus_source: str = "q",
    ) -> None:
        thresholds = (label_overlap,) * 2 if isinstance(label_overlap, (int, float)) else tuple(label_overlap)
        if len(thresholds) != 2:
            raise ValueError(f"label_overlap needs one value or two (layers 2, 3), got {label_overlap}")
        self.loss_fn = loss_fn
        self.bank = bank
        self.num_focus = num_focus
        self.extra_benign = extra_benign
        self.label_overlap = (float(thresholds[0]), float(thresholds[1]))
        self.augment = augment
        self.explore = explore
        self.guide = guide
        self.focus_source = check_focus_source(focus_source)

    def __call__(
        self,
        model: torch.nn.Module,
        images: torch.Tensor,
        boxes: torch.Tensor | np.ndarray,
        labels: torch.Tensor,
        slide_ids: Sequence[str],
        read: ReadRegions,
        overlap: RegionOverlap | None = None,
        num_layers: int = 3,
        lambda_fwd: Sequence[float] = (1.0, 1.0, 1.0),
        lambda_bwd: Sequence[float] = (0.1, 0.1),
        field_slide: np.ndarray | None = None,
        survival: torch.Tensor | None = None,
    ) -> CascadeStep:
        """Walk the cascade in training mode on one batch of slides and compute the Eq. 7 losses.

        Args:
            model: the ``SMT`` module, in training mode.
            images: ``(F, 3, side, side)`` uint8 layer-1 images (each slide's fields of view).
            boxes: ``(F, 3)`` level-0 boxes of the layer-1 regions.
            labels: ``(B,)`` slide labels.
            slide_ids: ``B`` slide ids (score-bank keys).
            read: reader of the next layers' regions.
            overlap: optional annotation overlap of regions (guidance and labels).
            num_layers: active layers (the staged schedule).
            lambda_fwd: ``lambda_fwd`` of layers 1-3 for this step.
            lambda_bwd: ``lambda_bwd`` of layers 1-2 for this step.
            field_slide: ``(F,)`` the slide of each layer-1 field (default: one field per slide).
            survival: ``(B, 2)`` each slide's survival time and event, NaN where unknown (the risk head's
                Cox partial likelihood, over the slides that have them).

        Raises:
            ValueError: if the batch sizes disagree or ``num_layers`` is not 1-3.
        """
        fields = np.arange(len(images)) if field_slide is None else np.asarray(field_slide, dtype=np.int64)
        if not len(fields) == images.shape[0] or not len(slide_ids) == labels.shape[0] == fields.max() + 1:
            raise ValueError("labels and slide_ids need one entry per slide, images and boxes one per field")
        grid = int(model.grid)
        field_labels = labels.to(torch.long).cpu()[torch.as_tensor(fields)]
        if overlap is not None:  # an annotated slide's field without tumour is negative
            known = torch.as_tensor(overlap(fields, np.asarray(boxes, dtype=np.float64).reshape(-1, 3)))
            field_labels = next_labels(
                field_labels, torch.ones(len(fields), 1, dtype=torch.bool), known[:, None], 0.0
            )[:, 0]
        focus = TrainingFocus(
            grid,
            self.bank,
            slide_ids,
            labels,
            field_labels,
            self.num_focus,
            self.focus_source,
            self.extra_benign,
            self.explore,
            self.guide,
            overlap,
            self.label_overlap,
            bool(getattr(model, "spread_focus", False)),
        )
        passes = walk(
            model,
            Regions.first(boxes, fields),
            iter([(np.arange(len(fields)), images)]),
            read,
            GradRunner(grid, self.augment),
            focus,
            num_layers,
            images.device,
        )
        terms: dict[str, torch.Tensor] = {}
        for step, level_labels in zip(passes, focus.labels):
            out = step.run.out
            terms[f"cls{step.level}"] = self.loss_fn.classification[step.level - 1](out.logits, level_labels)
        for level, (rows, score, tissue) in enumerate(focus.scores, start=1):
            q = passes[level - 1].run.out.q
            assert q is not None
            terms[f"focus{level}"] = self.loss_fn.focus(
                q[torch.as_tensor(rows, device=q.device)], score, tissue.to(q.device)
            )
        for parent, child in zip(passes, passes[1:]):
            self._backward_terms(terms, parent, child.run.out)
        for level, (rows, positive, taught) in focus.annotated.items():
            q = passes[level - 1].run.out.q
            assert q is not None
            if taught.any():
                mask = taught.to(q.device)
                q_rows = q[torch.as_tensor(rows, device=q.device)]
                terms[f"ann{level}"] = self.loss_fn.recheck(
                    q_rows[mask], positive.to(q.device)[mask].to(q.dtype)
                )
        if getattr(model, "slide_head", None) is not None and len(passes) == 3:
            slides, logits = self._pool(model.slide_head, passes[2])
            target = labels.to(logits.device, torch.long)[torch.as_tensor(slides)]
            terms["slide"] = F.cross_entropy(logits.float(), target)
        if getattr(model, "risk_head", None) is not None and len(passes) == 3 and survival is not None:
            slides, risk = self._pool(model.risk_head, passes[2])
            time, event = survival.to(risk.device, torch.float32)[torch.as_tensor(slides)].unbind(1)
            known = ~(time.isnan() | event.isnan())
            terms["risk"] = cox_partial_likelihood(risk[known, 0], time[known], event[known])
        losses = self.loss_fn(terms, lambda_fwd, lambda_bwd)
        return CascadeStep(losses, passes, focus.labels[: len(passes)])

    @staticmethod
    def _pool(head: torch.nn.Module, last: LayerPass) -> tuple[np.ndarray, torch.Tensor]:
        """The slides of the batch that reached layer 3 and a slide-level head's output for each ``(S, out)``,
        pooled from their layer-3 class-token embeddings, detached: the slide and risk heads learn to pool
        what layer 3 learned from its region labels."""
        embeddings = last.run.out.cls_embedding.detach()
        slides = np.unique(last.regions.slide)
        pooled = [
            head(embeddings[torch.as_tensor(np.flatnonzero(last.regions.slide == s))])[0] for s in slides
        ]
        return slides, torch.cat(pooled)

    def _backward_terms(self, terms: dict[str, torch.Tensor], parent: LayerPass, child: LayerOutput) -> None:
        """Add ``L_ret`` (Eq. 4) and ``L_emb`` (Eq. 5-6) of ``parent``'s layer, taught by its K focused
        children (the extra benign region teaches nothing back)."""
        q, rows, selection = parent.run.out.q, parent.rows, parent.selection
        assert q is not None and rows is not None and selection is not None
        device = q.device
        k = self.num_focus
        picks = selection.parent[:, :k].to(device), selection.index[:, :k].to(device)
        q_selected = q[torch.as_tensor(rows, device=device)][picks]
        per_group = selection.index.shape[1]
        p_next = positive_mass(child.probs).reshape(-1, per_group)[:, :k]
        terms[f"ret{parent.level}"] = self.loss_fn.recheck(q_selected, p_next)
        # Eq. 5-6: each parent region against the mean class token of the regions it chose
        width = child.cls_embedding.shape[-1]
        next_cls = child.cls_embedding.reshape(-1, per_group, width)[:, :k].reshape(-1, width)
        owner = picks[0].reshape(-1)
        parents = owner.unique()
        count = torch.zeros(len(rows), device=device).index_add_(
            0, owner, torch.ones_like(owner, dtype=torch.float)
        )
        total = next_cls.new_zeros(len(rows), width).index_add_(0, owner, next_cls.detach())
        mean = total[parents] / count[parents, None].to(total.dtype)
        cls = parent.run.out.cls_embedding[torch.as_tensor(rows, device=device)][parents]
        terms[f"emb{parent.level}"] = self.loss_fn.distillation(cls, mean[:, None])
