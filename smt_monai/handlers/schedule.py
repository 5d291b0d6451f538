"""The staged schedule of SMT training (method-notes "Schedule"): layer activation and loss-weight ramp."""

from __future__ import annotations

from collections.abc import Sequence

from ignite.engine import Engine, Events


class StagedLayerActivation:
    """Run only the layers whose start epoch has come: layer ``l`` trains from epoch ``start_epoch[l-1]``.

    Sets ``engine.state.num_layers`` at every epoch start (paper: layers 2 and 3 start at epochs 20 and 50 of
    100). A layer before its start is not run in training at all, so its reads cost nothing.

    Args:
        start_epoch: 1-based start epochs of layers 1, 2, 3 (non-decreasing; layer 1 starts at 1).

    Raises:
        ValueError: wrong length, layer 1 not starting at epoch 1, or decreasing start epochs.
    """

    def __init__(self, start_epoch: Sequence[int] = (1, 20, 50)) -> None:
        start = [int(s) for s in start_epoch]
        if len(start) != 3 or start[0] != 1 or start != sorted(start):
            raise ValueError(
                f"start_epoch must be 3 non-decreasing epochs starting at 1, got {list(start_epoch)}"
            )
        self.start_epoch = start

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def active_layers(self, epoch: int) -> int:
        return sum(epoch >= s for s in self.start_epoch)

    def __call__(self, engine: Engine) -> None:
        engine.state.num_layers = self.active_layers(engine.state.epoch)


class LossWeightRamp:
    """Ramp each layer's loss weights linearly from 0 over ``ramp_epochs`` epochs from its start epoch.

    ``lambda_fwd[l]`` (``L_cls`` and ``L_focus`` of layer ``l``) reaches ``fwd_max`` and ``lambda_bwd[l]``
    (``L_emb`` and ``L_ret`` of layer ``l``, taught by layer ``l + 1``) reaches ``bwd_max``; the backward
    weights follow the ramp of layer ``l + 1``, since their target only exists once that layer runs. In epoch
    ``start + j`` a weight is ``(j + 1) / ramp_epochs`` of its maximum (paper: 20 epochs to 1 and 0.1).

    Sets ``engine.state.lambda_fwd`` (3 values) and ``engine.state.lambda_bwd`` (2) at every epoch start;
    the values are a function of the epoch alone, so a resumed run continues the ramp exactly.

    Args:
        start_epoch: start epochs of layers 1-3 (as :class:`StagedLayerActivation`).
        ramp_epochs: epochs to reach the maximum (0: no ramp).
        fwd_max: final ``lambda_fwd``.
        bwd_max: final ``lambda_bwd``.
    """

    def __init__(
        self,
        start_epoch: Sequence[int] = (1, 20, 50),
        ramp_epochs: int = 20,
        fwd_max: float = 1.0,
        bwd_max: float = 0.1,
    ) -> None:
        if ramp_epochs < 0:
            raise ValueError(f"ramp_epochs must be >= 0, got {ramp_epochs}")
        self.start_epoch = [int(s) for s in start_epoch]
        self.ramp_epochs = ramp_epochs
        self.fwd_max = fwd_max
        self.bwd_max = bwd_max

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def weight(self, layer: int, epoch: int) -> float:
        """Ramp factor in ``[0, 1]`` of layer ``layer`` (1-based) in epoch ``epoch``."""
        elapsed = epoch - self.start_epoch[layer - 1] + 1
        if elapsed <= 0:
            return 0.0
        return 1.0 if self.ramp_epochs == 0 else min(1.0, elapsed / self.ramp_epochs)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        engine.state.lambda_fwd = [self.fwd_max * self.weight(layer, epoch) for layer in (1, 2, 3)]
        engine.state.lambda_bwd = [self.bwd_max * self.weight(layer + 1, epoch) for layer in (1, 2)]
