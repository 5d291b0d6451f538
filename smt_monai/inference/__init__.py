"""SMT at inference: the Python API, slide-list prediction, the result writers and the model file."""

from smt_monai.inference.api import SMTPredictor
from smt_monai.inference.model import CARD_KEY, ModelCard, ModelFileError, load_model, save_model
from smt_monai.inference.predictor import NoSlideSucceededError, SlideListPredictor

__all__ = [
    "CARD_KEY",
    "ModelCard",
    "ModelFileError",
    "NoSlideSucceededError",
    "SMTPredictor",
    "SlideListPredictor",
    "load_model",
    "save_model",
]
