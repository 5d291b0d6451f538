"""Eq. 7: the losses of every layer combined into ``L_V`` (the ViTs) and ``L_F`` (the focusing predictors)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from smt_monai.losses.classification import ClassificationLoss
from smt_monai.losses.distillation import EmbeddingDistillationLoss
from smt_monai.losses.focus import FocusLoss
from smt_monai.losses.recheck import RecheckLoss

TERMS: tuple[str, ...] = (
    "cls1", "cls2", "cls3", "emb1", "emb2", "focus1", "focus2", "ret1", "ret2", "ann1", "ann2", "slide",
    "risk",
)  # fmt: skip
"""Names of the terms: per layer ``cls{l}`` (Eq. 1), ``emb{l}`` (Eq. 6), ``focus{l}`` (Eq. 3), ``ret{l}``
(Eq. 4), ``ann{l}`` (Eq. 4's divergence from the annotation, on every tissue patch); ``slide``, the
cross-entropy of the learned aggregation (``SMTConfig.slide_head``) against the slide labels, and ``risk``,
the Cox partial likelihood of the risk head (``SMTConfig.risk_head``) against the slides' survival, each
weighted as layer 3's ``L_cls``."""


class SMTLoss(nn.Module):
    """The SMT objective of Eq. 7, holding the modules of its terms.

    ``L_V = sum_{l=1..3} lam_fwd[l] L_cls[l] + sum_{l=1,2} lam_bwd[l] L_emb[l]`` and
    ``L_F = sum_{l=1,2} w_focus[l] lam_fwd[l] L_focus[l] + lam_bwd[l] (w_ret L_ret[l] + w_ann L_ann[l])``;
    the total is their sum (they train disjoint parameters unless ``focus_grad_to_encoder`` is set).
    ``w_focus`` is this project's per-layer focus-loss weight. Its default switches ``L_focus`` off at both
    layers, so that ``L_ret`` alone drives the focus: the Eq. 2 target is uninformative where a layer cannot
    classify (tumour invisible on the thumbnail; tumour and mimic alike at layer 2's magnification) and its
    min-max normalisation forces a full 0-to-1 target on every region, which on the synthetic cohort pulled
    layer 2's focus off the tumour (bundle/docs/README.md, "Does it learn?"). ``focus_weight=(1, 1)`` is the
    paper's setting. ``recheck_weight`` (``w_ret``) and ``distillation_weight`` scale every ``L_ret`` and
    every ``L_emb`` (1 in the paper; 0 switches one backward loss off, the ablations of the paper's Table 2).
    ``L_ann`` is this project's: on annotated slides it teaches ``q`` on every tissue patch what ``L_ret``
    teaches it on the K patches read, with the annotation as the next layer's answer
    (``CascadeTraining``); ``annotation_weight=0`` is the paper's objective. The ``lambda``s are given per
    call, so a schedule (the loss-weight ramp) can change them every iteration.

    Args:
        focus_weight: ``w_focus`` of layers 1 and 2.
        class_balanced: whether ``L_cls`` of layers 1, 2, 3 is class-balanced (method-notes: layers 2-3).
        recheck_clamp: ``clamp`` of ``RecheckLoss``.
        recheck_weight: factor on ``lambda_bwd[l] L_ret[l]``.
        distillation_weight: factor on ``lambda_bwd[l] L_emb[l]``.
        annotation_weight: ``w_ann``, factor on ``lambda_bwd[l] L_ann[l]``.

    Raises:
        ValueError: if ``focus_weight`` does not have 2 entries or ``class_balanced`` 3.
    """

    def __init__(
        self,
        focus_weight: Sequence[float] = (0.0, 0.0),
        class_balanced: Sequence[bool] = (False, True, True),
        recheck_clamp: float = 1e-6,
        recheck_weight: float = 1.0,
        distillation_weight: float = 1.0,
        annotation_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if len(focus_weight) != 2 or len(class_balanced) != 3:
            raise ValueError("focus_weight needs 2 entries (layers 1-2), class_balanced 3 (layers 1-3)")
        self.focus_weight = tuple(float(w) for w in focus_weight)
        self.recheck_weight = float(recheck_weight)
        self.distillation_weight = float(distillation_weight)
        self.annotation_weight = float(annotation_weight)
        self.classification = nn.ModuleList([ClassificationLoss(bool(b)) for b in class_balanced])
        self.focus = FocusLoss()
        self.recheck = RecheckLoss(clamp=recheck_clamp)
        self.distillation = EmbeddingDistillationLoss()

    def forward(
        self, terms: Mapping[str, torch.Tensor], lambda_fwd: Sequence[float], lambda_bwd: Sequence[float]
    ) -> dict[str, torch.Tensor]:
        """Combine the terms of Eq. 7.

        Args:
            terms: scalar terms named as in ``TERMS``; absent terms (layers not yet active) count as 0.
            lambda_fwd: ``lambda_fwd`` of layers 1, 2, 3.
            lambda_bwd: ``lambda_bwd`` of layers 1, 2.

        Returns:
            Every given term plus ``"L_V"``, ``"L_F"`` and ``"total"``.

        Raises:
            ValueError: for an unknown term name, no terms, or lambdas of the wrong length.
        """
        unknown = set(terms) - set(TERMS)
        if unknown or not terms:
            raise ValueError(f"terms must be a non-empty subset of {TERMS}, got {sorted(terms)}")
        if len(lambda_fwd) != 3 or len(lambda_bwd) != 2:
            raise ValueError("lambda_fwd needs 3 entries (layers 1-3) and lambda_bwd 2 (layers 1-2)")
        zero = next(iter(terms.values())).new_zeros(())
        loss_v, loss_f = zero, zero
        for layer in (1, 2, 3):
            if f"cls{layer}" in terms:
                loss_v = loss_v + lambda_fwd[layer - 1] * terms[f"cls{layer}"]
        for head in ("slide", "risk"):
            if head in terms:
                loss_v = loss_v + lambda_fwd[2] * terms[head]
        for layer in (1, 2):
            if f"emb{layer}" in terms:
                loss_v = loss_v + self.distillation_weight * lambda_bwd[layer - 1] * terms[f"emb{layer}"]
            if f"focus{layer}" in terms:
                weight = self.focus_weight[layer - 1] * lambda_fwd[layer - 1]
                loss_f = loss_f + weight * terms[f"focus{layer}"]
            if f"ret{layer}" in terms:
                loss_f = loss_f + self.recheck_weight * lambda_bwd[layer - 1] * terms[f"ret{layer}"]
            if f"ann{layer}" in terms:
                loss_f = loss_f + self.annotation_weight * lambda_bwd[layer - 1] * terms[f"ann{layer}"]
        return {**terms, "L_V": loss_v, "L_F": loss_f, "total": loss_v + loss_f}
