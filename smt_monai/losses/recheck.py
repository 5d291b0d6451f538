"""The recheck ("rethinking") loss of Eq. 4."""

from __future__ import annotations

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from smt_monai.losses.utils import reduce_loss


class RecheckLoss(_Loss):
    """``L_ret = 1/K sum_k KL(Bern(P_k) || Bern(q_{t_k}))`` (Eq. 4).

    ``P_k`` is the next layer's positive probability mass ``sum_{c>0} p_c`` on the region magnified from the
    selected patch ``t_k`` (detached: the next layer is the teacher), ``q_{t_k}`` the focusing prediction of
    that patch. Reading ``p^[2]`` and ``q`` of Eq. 4 as Bernoulli distributions of "contains tumour", the KL
    divergence is ``P log(P / q) + (1 - P) log((1 - P) / (1 - q))``. ``P log P`` terms use ``xlogy`` (0 at
    ``P = 0``), and ``q`` is clamped to ``[clamp, 1 - clamp]``, so ``P`` and ``q`` at exactly 0 or 1 give a
    finite loss (its gradient vanishes only where ``q`` is within ``clamp`` of 0 or 1).

    Args:
        clamp: margin that keeps ``log q`` and ``log (1 - q)`` finite.
        reduction: ``"mean"`` (over ``k`` and the batch), ``"sum"`` or ``"none"`` (``(B, K)`` terms).
    """

    def __init__(self, clamp: float = 1e-6, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if not 0.0 < clamp < 0.5:
            raise ValueError(f"clamp must be in (0, 0.5), got {clamp}")
        self.clamp = clamp

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: ``(B, K)`` focusing predictions ``q_{t_k}`` of the selected patches.
            target: ``(B, K)`` next-layer positive probabilities ``P_k`` of the regions they became.

        Raises:
            ValueError: if the shapes differ.
        """
        if input.shape != target.shape:
            raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} differ in shape")
        p = target.detach().to(input.dtype).clamp(0.0, 1.0)
        q = input.clamp(self.clamp, 1.0 - self.clamp)
        kl = torch.xlogy(p, p) - p * torch.log(q)
        kl = kl + torch.xlogy(1.0 - p, 1.0 - p) - (1.0 - p) * torch.log1p(-q)
        return reduce_loss(kl, self.reduction)
