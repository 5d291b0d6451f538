"""The SMT cascade, one walk over the layers for training and inference (Sec. 3.2-3.3, Eq. 1-7)."""

from smt_monai.cascade.prediction import AGGREGATIONS, SlidePrediction, aggregate, predict_slide
from smt_monai.cascade.training import CascadeStep, CascadeTraining, GradRunner, TrainingFocus
from smt_monai.cascade.walk import ChunkedRunner, LayerPass, LayerRun, Regions, TopK, walk

__all__ = [
    "AGGREGATIONS",
    "CascadeStep",
    "CascadeTraining",
    "ChunkedRunner",
    "GradRunner",
    "LayerPass",
    "LayerRun",
    "Regions",
    "SlidePrediction",
    "TopK",
    "TrainingFocus",
    "aggregate",
    "predict_slide",
    "walk",
]
