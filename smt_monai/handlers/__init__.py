"""Ignite handlers of SMT training and evaluation, each a small class with ``attach(engine)``."""

from smt_monai.handlers.checkpoint import BestModelCheckpoint, CheckpointError, TrainingCheckpoint
from smt_monai.handlers.metrics import (
    BalancedAccuracy,
    ClassRecall,
    ConcordanceIndex,
    ConfusionMatrix,
    DecisionThreshold,
    FocusRate,
    LesionRecall,
    QuadraticKappa,
    SlideAUC,
)
from smt_monai.handlers.reporting import ConfusionMatrixWriter, MetricsJSONWriter, ProgressBarHandler
from smt_monai.handlers.schedule import LossWeightRamp, StagedLayerActivation
from smt_monai.handlers.score_bank import ScoreBankPersistence

__all__ = [
    "BalancedAccuracy",
    "ClassRecall",
    "ConcordanceIndex",
    "ConfusionMatrix",
    "ConfusionMatrixWriter",
    "DecisionThreshold",
    "BestModelCheckpoint",
    "CheckpointError",
    "FocusRate",
    "LesionRecall",
    "LossWeightRamp",
    "MetricsJSONWriter",
    "ProgressBarHandler",
    "QuadraticKappa",
    "ScoreBankPersistence",
    "SlideAUC",
    "StagedLayerActivation",
    "TrainingCheckpoint",
]
