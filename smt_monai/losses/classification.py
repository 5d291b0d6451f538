"""The classification loss of Eq. 1, optionally class-balanced."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from smt_monai.losses.utils import reduce_loss


class ClassificationLoss(_Loss):
    """Cross-entropy of a layer's logits against its labels (Eq. 1).

    Eq. 1 as printed divides the cross-entropy by the number of classes ``C``; this is the usual per-sample
    cross-entropy (``C`` times Eq. 1), so ``lambda_fwd`` keeps its meaning whatever ``C`` is.

    Region labels are imbalanced, so method-notes makes layers 2-3 class-balanced: with
    ``class_balanced=True`` each sample is weighted by ``B / (C_b * n_c)``, ``n_c`` the count of its class
    in the batch and ``C_b`` the number of classes present, so every present class contributes equally and
    the weights average to 1.

    Args:
        class_balanced: weight samples by the inverse frequency of their class in the batch.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(B,)`` weighted terms).
    """

    def __init__(
        self, class_balanced: bool = False, reduction: LossReduction | str = LossReduction.MEAN
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.class_balanced = class_balanced

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: ``(B, C)`` logits.
            target: ``(B,)`` class indices.
        """
        target = target.to(device=input.device, dtype=torch.long)
        loss = F.cross_entropy(input, target, reduction="none")
        if self.class_balanced:
            counts = torch.bincount(target, minlength=input.shape[1]).to(input.dtype)
            present = (counts > 0).sum()
            loss = loss * target.numel() / (present * counts[target])
        return reduce_loss(loss, self.reduction)
