"""Ignite workflows of SMT: the cascade trainer and evaluator, and their I/O."""

from smt_monai.engines.evaluator import SMTEvaluator
from smt_monai.engines.region_io import AnnotationOverlap, BatchRegionReader
from smt_monai.engines.trainer import SMTTrainer, TrainingDivergedError, average_gradients, smt_param_groups

__all__ = [
    "AnnotationOverlap",
    "BatchRegionReader",
    "SMTEvaluator",
    "SMTTrainer",
    "TrainingDivergedError",
    "average_gradients",
    "smt_param_groups",
]
