"""Persistence of the Eq. 2 score bank, so a resumed run keeps its temporal ensemble."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from smt_monai.focus.bank import ScoreBank
from smt_monai.handlers.checkpoint import CheckpointError, is_main_process, load_trusted
from smt_monai.utils import atomic_path

logger = logging.getLogger(__name__)


class ScoreBankPersistence:
    """Save the score bank after every epoch (atomically) and load it when a run resumes.

    Under ``torchrun`` each process scores the slides it trains on; at every epoch end the banks are
    merged over all processes (a region scored by several keeps the entry of the highest rank), so every
    process, and the saved file, holds the whole cohort's scores. Only rank 0 writes.

    Args:
        bank: the trainer's score bank.
        path: file to write (``score_bank.pt`` in the run's output folder).
        resume: load ``path`` when training starts, if it exists.
    """

    def __init__(self, bank: ScoreBank, path: str | os.PathLike, resume: bool = False) -> None:
        self.bank = bank
        self.path = Path(path)
        self.resume = resume

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def load(self, engine: Engine) -> None:
        """Restore the bank from ``path`` when resuming and the file exists.

        Raises:
            CheckpointError: the file does not load as tensors and plain data (a crafted pickle is refused,
                never run), or is not a score bank.
        """
        if self.resume and self.path.exists():
            state = load_trusted(self.path, ("keys", "scores"))
            try:
                self.bank.load_state_dict(state)
            except (TypeError, ValueError) as exc:
                raise CheckpointError(self.path, f"not a score bank ({exc})") from None
            logger.info("score bank restored from %s (%d regions)", self.path, len(self.bank))

    def __call__(self, engine: Engine) -> None:
        if dist.is_available() and dist.is_initialized():
            states: list = [None] * dist.get_world_size()
            dist.all_gather_object(states, self.bank.state_dict())
            for state in states:
                self.bank.merge_state_dict(state)
        if not is_main_process():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save(self.bank.state_dict(), tmp)
