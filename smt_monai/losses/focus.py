"""The focusing loss of Eq. 3."""

from __future__ import annotations

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from smt_monai.focus.score import minmax_normalize
from smt_monai.losses.utils import reduce_loss


class FocusLoss(_Loss):
    """``L_focus = 1/L^2 sum_i |q_i - S~_i|`` (Eq. 3): the focusing predictor regresses the normalised score.

    The target is detached: the score bank is a constant of the step. With ``normalize=True`` the target is
    Eq. 3's min-max normalisation of the raw ensemble ``S`` over each region's patches (all-equal scores give
    an all-zero target, not NaN); with ``normalize=False`` the caller passes ``S~`` itself.

    Args:
        normalize: whether to min-max normalise ``target`` over its last dimension first.
        reduction: ``"mean"`` (Eq. 3 averaged over regions), ``"sum"`` or ``"none"`` (``(B, N)`` terms).
    """

    def __init__(self, normalize: bool = True, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.normalize = normalize

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            input: ``(B, N)`` focusing predictions ``q`` in ``[0, 1]``.
            target: ``(B, N)`` scores ``S`` (or ``S~`` when ``normalize=False``).
            valid: optional ``(B, N)`` bool, the patches holding tissue: only they enter Eq. 3's
                normalisation; the target of the others is 0, so ``q`` learns to stay low on glass.

        Raises:
            ValueError: if the shapes differ.
        """
        if input.shape != target.shape:
            raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} differ in shape")
        target = target.detach().to(input.dtype)
        if self.normalize:
            target = minmax_normalize(target, valid)
        return reduce_loss((input - target).abs(), self.reduction)
