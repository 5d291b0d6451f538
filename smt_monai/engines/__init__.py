"""Ignite workflows of SMT: the cascade trainer and evaluator."""

from smt_monai.engines.evaluator import SMTEvaluator
from smt_monai.engines.trainer import SMTTrainer, TrainingDivergedError, average_gradients, smt_param_groups

__all__ = [
    "SMTEvaluator",
    "SMTTrainer",
    "TrainingDivergedError",
    "average_gradients",
    "smt_param_groups",
]
