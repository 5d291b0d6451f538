"""SMT at inference: the cascade per slide, slide-list prediction, and the result writers."""

from smt_monai.inference.cascade import SlidePrediction, aggregate, predict_cascade
from smt_monai.inference.model import load_network
from smt_monai.inference.predictor import NoSlideSucceededError, SlideListPredictor

__all__ = [
    "NoSlideSucceededError",
    "SlideListPredictor",
    "SlidePrediction",
    "aggregate",
    "load_network",
    "predict_cascade",
]
