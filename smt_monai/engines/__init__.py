"""Ignite workflows of SMT: the cascade trainer and evaluator, and their I/O."""

import re
from pathlib import Path

from smt_monai.engines.evaluator import SMTEvaluator
from smt_monai.engines.region_io import AnnotationOverlap, BatchRegionReader
from smt_monai.engines.trainer import SMTTrainer, TrainingDivergedError, average_gradients, smt_param_groups


def last_checkpoint(folder: str) -> str:
    """The newest ``checkpoint_epoch=N.pt`` that MONAI's ``CheckpointSaver`` wrote in ``folder``.

    Raises:
        FileNotFoundError: there is none (``resume: true`` on a run that never saved).
    """
    found = sorted(
        Path(folder).glob("*checkpoint_epoch=*.pt"),
        key=lambda p: int(re.search(r"epoch=(\d+)", p.name).group(1)),  # type: ignore[union-attr]
    )
    if not found:
        raise FileNotFoundError(f"resume: no checkpoint_epoch=N.pt in {folder}")
    return str(found[-1])


__all__ = [
    "AnnotationOverlap",
    "BatchRegionReader",
    "SMTEvaluator",
    "SMTTrainer",
    "TrainingDivergedError",
    "average_gradients",
    "last_checkpoint",
    "smt_param_groups",
]
