"""The training checkpoint: saved every epoch, and the run resumed from it with ``resume: true``."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver


def checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of each ``checkpoint_epoch=N.pt`` that ``CheckpointSaver`` wrote, oldest first."""
    found = []
    for path in Path(folder).glob("*checkpoint_epoch=*.pt"):
        match = re.search(r"epoch=(\d+)", path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def last_checkpoint(folder: str | os.PathLike) -> str:
    """The newest checkpoint in ``folder``.

    Raises:
        FileNotFoundError: there is none (``resume: true`` on a run that never saved).
    """
    found = checkpoints(folder)
    if not found:
        raise FileNotFoundError(f"resume: no checkpoint_epoch=N.pt in {folder}")
    return str(found[-1][1])


class TrainingCheckpoint:
    """Keep the last epoch's network, optimiser, learning-rate schedule and trainer state in ``save_dir``, and
    resume from it.

    The trainer is part of what is saved, so it cannot be named in the config that builds it; this handler
    adds it when attached. MONAI's ``CheckpointSaver`` writes ``checkpoint_epoch=N.pt`` (keeping the last
    one) on rank 0; with ``resume``, MONAI's ``CheckpointLoader`` restores the newest one on every rank before
    training starts, so the epoch count, optimiser momentum and (through the epoch) the schedule continue.

    Args:
        save_dir: folder of the checkpoints.
        network: the network.
        optimizer: the optimiser.
        lr_scheduler: the learning-rate scheduler, if any (attach its ``LrScheduleHandler`` before this
            handler, so that a checkpoint holds the schedule after the epoch's step).
        resume: restore the newest checkpoint in ``save_dir`` when training starts.
        map_location: where loaded tensors go.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        resume: bool = False,
        map_location: torch.device | str | None = None,
    ) -> None:
        self.save_dir = str(save_dir)
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.resume = resume
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        objects = {"network": self.network, "optimizer": self.optimizer, "trainer": engine}
        if self.lr_scheduler is not None:
            objects["lr_scheduler"] = self.lr_scheduler
        if self.resume:
            path = last_checkpoint(self.save_dir)
            CheckpointLoader(load_path=path, load_dict=objects, map_location=self.map_location).attach(engine)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            CheckpointSaver(
                save_dir=self.save_dir, save_dict=objects, save_interval=1, n_saved=1, epoch_level=True
            ).attach(engine)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._prune)

    def _prune(self, engine: Engine) -> None:
        """Remove checkpoints of earlier epochs (a resumed run's saver does not know of them)."""
        for epoch, path in checkpoints(self.save_dir):
            if epoch < engine.state.epoch:
                path.unlink(missing_ok=True)
