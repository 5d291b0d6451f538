"""The reduction shared by the SMT losses (MONAI's ``LossReduction`` semantics)."""

from __future__ import annotations

import torch
from monai.utils import LossReduction


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``reduction`` (``"none"``, ``"mean"`` or ``"sum"``) to elementwise ``loss``.

    Raises:
        ValueError: for an unknown reduction.
    """
    if reduction == LossReduction.MEAN.value:
        return loss.mean()
    if reduction == LossReduction.SUM.value:
        return loss.sum()
    if reduction == LossReduction.NONE.value:
        return loss
    raise ValueError(f'Unsupported reduction: {reduction}, available options are ["mean", "sum", "none"].')
