"""The class-token embedding distillation loss of Eq. 5-6."""

from __future__ import annotations

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from smt_monai.losses.utils import reduce_loss


class EmbeddingDistillationLoss(_Loss):
    """``L_emb = || ViT^[l](X) - f ||^2`` with ``f = 1/K sum_k ViT^[l+1](X_k)`` (Eq. 5, 6).

    The target ``f`` is the mean class-token embedding of the next layer's ``K`` focused regions, detached,
    so this loss trains layer ``l`` only. As method-notes fixes it, the squared difference is averaged (not
    summed) over the embedding dimensions, so the loss scale does not depend on the width.

    Args:
        reduction: ``"mean"`` (over the batch), ``"sum"`` or ``"none"`` (``(B,)`` terms).
    """

    def __init__(self, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: ``(B, D)`` class-token embeddings of layer ``l``.
            target: ``(B, K, D)`` class-token embeddings of the ``K`` next-layer regions of each sample.

        Raises:
            ValueError: if the shapes do not match.
        """
        if target.dim() != 3 or target.shape[0] != input.shape[0] or target.shape[2] != input.shape[-1]:
            raise ValueError(f"expected target (B, K, D) for input (B, D), got {tuple(target.shape)}")
        f = target.detach().to(input.dtype).mean(dim=1)
        return reduce_loss((input - f).pow(2).mean(dim=-1), self.reduction)
