"""SMT networks: the per-layer ViT with focusing predictor, the three-layer SMT module and its presets, and
the loading of pretrained ViT-S/16 weights into their transformers."""

from smt_monai.networks.attention import AttentionWithWeights
from smt_monai.networks.blocks import AttentionExposingBlock, EncoderBlock
from smt_monai.networks.layer import FocusPredictor, LayerOutput, SMTLayer
from smt_monai.networks.normalization import HE_OD_MEAN, HE_OD_STD, normalize_he
from smt_monai.networks.pretrained import PretrainedWeightsError, load_pretrained, read_vit_checkpoint
from smt_monai.networks.smt import PRESETS, SMT, SMTConfig, smt_paper, smt_tiny
from smt_monai.networks.stem import PatchStem

__all__ = [
    "HE_OD_MEAN",
    "HE_OD_STD",
    "PRESETS",
    "SMT",
    "AttentionExposingBlock",
    "AttentionWithWeights",
    "EncoderBlock",
    "FocusPredictor",
    "LayerOutput",
    "PatchStem",
    "PretrainedWeightsError",
    "SMTConfig",
    "SMTLayer",
    "load_pretrained",
    "normalize_he",
    "read_vit_checkpoint",
    "smt_paper",
    "smt_tiny",
]
