"""Ignite handlers of SMT training and evaluation, each a small class with ``attach(engine)``."""

from smt_monai.handlers.checkpoint import BestModelCheckpoint, CheckpointError, TrainingCheckpoint
from smt_monai.handlers.metrics import (
    BalancedAccuracy,
    DecisionThreshold,
    FocusRate,
    QuadraticKappa,
    SlideAUC,
)
from smt_monai.handlers.reporting import MetricsJSONWriter, ProgressBarHandler
from smt_monai.handlers.schedule import LossWeightRamp, StagedLayerActivation
from smt_monai.handlers.score_bank import ScoreBankPersistence

__all__ = [
    "BalancedAccuracy",
    "DecisionThreshold",
    "BestModelCheckpoint",
    "CheckpointError",
    "FocusRate",
    "LossWeightRamp",
    "MetricsJSONWriter",
    "ProgressBarHandler",
    "QuadraticKappa",
    "ScoreBankPersistence",
    "SlideAUC",
    "StagedLayerActivation",
    "TrainingCheckpoint",
]
