"""SMT at inference: the Python API, slide-list prediction, the result writers and model loading."""

from smt_monai.inference.api import SMTPredictor
from smt_monai.inference.model import load_network
from smt_monai.inference.predictor import NoSlideSucceededError, SlideListPredictor

__all__ = ["NoSlideSucceededError", "SMTPredictor", "SlideListPredictor", "load_network"]
