"""Checkpoints that survive a killed process: the training checkpoint (resume) and the best model.

Both write atomically (:func:`smt_monai.utils.atomic_path`: a temporary file, flushed, renamed): a process
killed mid-save leaves the previous file intact and a temporary file that the next run removes. The
training checkpoint removes older checkpoints only after the new one is complete. Every file is loaded with
``torch.load(..., weights_only=True)``: tensors and plain data only, never code.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from smt_monai.data.errors import UserError
from smt_monai.utils import atomic_path, remove_stale_temporaries, torch_load_problem

logger = logging.getLogger(__name__)

_TRAINING_KEYS = ("network", "optimizer", "trainer")
_BEST_KEYS = ("model", "best_metric", "best_epoch")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file (or a folder of them) cannot be used; the message names it and the problem, on one
    line."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")


def is_main_process() -> bool:
    """True unless this is a ``torchrun`` process of rank above 0: the one process that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def load_trusted(
    path: str | os.PathLike, keys: tuple[str, ...] = (), map_location: torch.device | str | None = None
) -> dict[str, Any]:
    """Load a ``torch.save`` file of tensors and plain data, refusing anything that would run code.

    Args:
        path: the file.
        keys: keys the loaded dictionary must hold.
        map_location: where tensors go.

    Raises:
        CheckpointError: the file is unreadable, truncated or corrupt, holds Python objects other than tensors
            and plain data (``weights_only=True`` refuses to build them), or lacks ``keys``.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(path, torch_load_problem(path, exc)) from None
    if not isinstance(state, dict) or any(key not in state for key in keys):
        found = [str(key) for key in state][:5] if isinstance(state, dict) else [type(state).__name__]
        more = ", ..." if isinstance(state, dict) and len(state) > 5 else ""
        raise CheckpointError(
            path, f"not the expected checkpoint: needs keys {', '.join(keys)}; holds {', '.join(found)}{more}"
        )
    return state


def checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of each ``checkpoint_epoch=N.pt`` in ``folder``, oldest first."""
    found = []
    for path in Path(folder).glob("checkpoint_epoch=*.pt"):
        match = re.fullmatch(r"checkpoint_epoch=(\d+)\.pt", path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def newest_checkpoint(
    folder: str | os.PathLike, map_location: torch.device | str | None = None
) -> tuple[Path, dict[str, Any]]:
    """The newest training checkpoint in ``folder`` that loads, and its content.

    A newer file that does not load (damaged on disk, or written without the flush a crash needs) is logged
    in one line and passed over for the previous one.

    Raises:
        CheckpointError: ``folder`` holds no checkpoint that loads.
    """
    found = checkpoints(folder)
    for _, path in reversed(found):
        try:
            return path, load_trusted(path, _TRAINING_KEYS, map_location)
        except CheckpointError as exc:
            logger.warning("resume: passing over %s", exc)
    problem = "no checkpoint_epoch=N.pt to resume from"
    if found:
        problem = f"none of its {len(found)} checkpoint_epoch=N.pt loads (resume needs one)"
    raise CheckpointError(folder, problem)


class TrainingCheckpoint:
    """Keep the last epoch's network, optimiser, learning-rate schedule and trainer state in ``save_dir``, and
    resume from it.

    At every epoch end, ``checkpoint_epoch=N.pt`` is written atomically, then every other checkpoint in the
    folder is removed, so a process killed at any moment leaves at least one complete checkpoint. With
    ``resume``, the newest checkpoint that loads is read when the handler is attached (a folder without one
    fails before training starts) and restored on every rank when training starts, so the epoch count,
    optimiser moments and (through the epoch) the schedule continue. The trainer is part of what is saved, so
    it cannot be named in the config that builds it; this handler adds it when attached. Only rank 0 writes,
    and at attach it removes the temporary files a killed run left.

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
        self.save_dir = Path(save_dir)
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.resume = resume
        self.map_location = map_location
        self._restore: tuple[Path, dict[str, Any]] | None = None

    def attach(self, engine: Engine) -> None:
        if is_main_process():
            for path in remove_stale_temporaries(self.save_dir):
                logger.info("removed %s, left by a killed run", path)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        if self.resume:
            self._restore = newest_checkpoint(self.save_dir, self.map_location)
            engine.add_event_handler(Events.STARTED, self.load)

    def state_dict(self, engine: Engine) -> dict[str, Any]:
        """What a checkpoint holds: the network, optimiser, schedule and trainer states."""
        state = {
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "trainer": engine.state_dict(),
        }
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        return state

    def save(self, engine: Engine) -> None:
        """Write this epoch's checkpoint atomically, then remove every other one."""
        path = self.save_dir / f"checkpoint_epoch={engine.state.epoch}.pt"
        self.save_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(engine), tmp)
        for _, other in checkpoints(self.save_dir):
            if other != path:
                other.unlink(missing_ok=True)

    def load(self, engine: Engine) -> None:
        """Restore the checkpoint read at attach (once: a later ``run`` continues from where it is).

        Raises:
            CheckpointError: the checkpoint's epoch is past the trainer's ``max_epochs``, or its states do not
                fit the network, optimiser or schedule.
        """
        if self._restore is None:
            return
        path, state = self._restore
        self._restore = None
        max_epochs = engine.state.max_epochs
        try:
            self.network.load_state_dict(state["network"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.lr_scheduler is not None:
                self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            engine.load_state_dict(state["trainer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(path, f"does not fit this run ({type(exc).__name__}: {exc})") from None
        if max_epochs is not None and engine.state.epoch > max_epochs:
            raise CheckpointError(
                path,
                f"holds epoch {engine.state.epoch}, past max_epochs {max_epochs}: raise max_epochs to go on",
            )
        engine.state.max_epochs = max_epochs
        logger.info("resumed from %s (epoch %d)", path, engine.state.epoch)


class BestModelCheckpoint:
    """Write the network to ``save_dir/filename`` whenever the validation's key metric improves.

    Attach it to the validation evaluator. Higher is better; a tie goes to the later epoch (the most trained
    of equally good models), so an epoch re-run after a resume that fell back to an earlier checkpoint does
    not replace the model that epoch already gave. The file holds ``{"model": network.state_dict(),
    "best_metric": ..., "best_epoch": ..., "metrics": {every finite validation metric}, **metadata}`` and
    loads with ``weights_only=True``; with ``resume``, the best score and epoch are read back from it, so a
    worse epoch of the resumed run does not replace the best model of the run before.

    Args:
        save_dir: folder of the model file.
        network: the network.
        filename: the model file's name.
        metric_name: the metric to compare; ``None``: the engine's key metric (``state.key_metric_name``).
        resume: read the best score of an earlier run from the model file, if it exists.
        metadata: entries added to the file (plain data and tensors), or a function returning them at each
            save; they may not use the keys ``model``, ``best_metric``, ``best_epoch`` or ``metrics``.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        network: torch.nn.Module,
        filename: str = "model.pt",
        metric_name: str | None = None,
        resume: bool = False,
        metadata: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.path = Path(save_dir) / filename
        self.network = network
        self.metric_name = metric_name
        self.resume = resume
        self.metadata = metadata
        self.best_metric: float | None = None
        self.best_epoch = -1

    def attach(self, engine: Engine) -> None:
        if is_main_process():
            remove_stale_temporaries(self.path.parent)
        if self.resume and self.path.exists():
            try:
                saved = load_trusted(self.path, _BEST_KEYS)
            except CheckpointError as exc:
                logger.warning("resume: the next improvement replaces %s", exc)
            else:
                self.best_metric, self.best_epoch = float(saved["best_metric"]), int(saved["best_epoch"])
                engine.state.best_metric, engine.state.best_metric_epoch = self.best_metric, self.best_epoch
                logger.info(
                    "resume: best %s so far %g (epoch %d)", self.path, self.best_metric, self.best_epoch
                )
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        current = float(engine.state.metrics[self.metric_name or engine.state.key_metric_name])
        epoch = int(engine.state.epoch)
        if not math.isfinite(current) or not (
            self.best_metric is None
            or current > self.best_metric
            or (current == self.best_metric and epoch > self.best_epoch)
        ):
            return
        metadata = dict(self.metadata() if callable(self.metadata) else self.metadata or {})
        if clash := sorted(set(metadata) & {*_BEST_KEYS, "metrics"}):
            raise ValueError(f"metadata may not use the keys {clash}")
        self.best_metric, self.best_epoch = current, epoch
        if not is_main_process():
            return
        metrics = {
            name: float(value)
            for name, value in engine.state.metrics.items()
            if isinstance(value, (int, float)) and math.isfinite(value)
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        saved = {"model": self.network.state_dict(), "best_metric": current, "best_epoch": epoch}
        with atomic_path(self.path) as tmp:
            torch.save({**saved, "metrics": metrics, **metadata}, tmp)
        logger.info("saved %s (%g at epoch %d)", self.path, current, epoch)
