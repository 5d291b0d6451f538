"""The Self-reform Multilayer Transformer: three ``SMTLayer``s with separate parameters (Sec. 3.2, Fig. 2).

All three layers share one architecture (``SMTConfig``) but not their weights: ``layer1`` reads the tissue
thumbnail, ``layer2`` the magnified regions of ``layer1``'s top-K patches, ``layer3`` those of ``layer2``'s.
Layers 1 and 2 carry a focusing predictor; layer 3 does not. The cascade itself (selection, region reads)
lives outside the network, which only maps images to ``LayerOutput``s.

Presets follow timm: ``smt_paper()`` (depth 12, 6 heads, width 384, grid 8, patch 256, as the paper) and
``smt_tiny()`` (width 64, depth 2, 4 heads, grid 4, patch 16) for tests and CPU demos; ``SMT(preset=...)``
is the same with a string, which is what a bundle config uses.

Each layer takes ``input_size`` (``grid * patch_size``) inputs, or ``read_size`` (``input_size // stem_pool``)
inputs already pooled: the bundle's readers deliver the latter, so resizing and normalising cost
``1 / stem_pool**2`` of what full-resolution inputs would (see ``PatchStem``).

TorchScript: ``torch.jit.script(SMT(...))`` works; the scripted module runs any layer with
``layer_output(x, layer)``, exposes the layers as ``.layer1``, ``.layer2``, ``.layer3`` and keeps ``grid``,
``input_size``, ``read_size``, ``geometry``, ``layer3_mpp`` and ``card`` (the model card as JSON), so an
export carries the geometry its readers need and the settings it was trained with.
"""

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from smt_monai.networks.layer import LayerOutput, SMTLayer
from smt_monai.networks.pooling import GatedAttentionPool
from smt_monai.networks.pretrained import load_pretrained


@dataclasses.dataclass(frozen=True)
class SMTConfig:
    """Architecture of every SMT layer; defaults are the paper's (Sec. 4.1) and the ``paper`` preset.

    Attributes:
        grid: patches per side of a layer input (paper: 8, or 16 for CAMELYON16/HCC).
        patch_size: pixels per side of a patch (paper: 256).
        num_classes: classes of every head (class 0 negative).
        embed_dim: token width.
        depth: transformer blocks per layer.
        num_heads: attention heads.
        mlp_ratio: MLP width as a multiple of ``embed_dim``.
        in_channels: input channels.
        dropout_rate: dropout in attention and MLPs.
        stem_pool: patch stem average-pooling factor (see ``PatchStem``); readers deliver inputs already
            pooled by it.
        stem_channels: channels of the stem's strided convolutions.
        stem_strides: strides of the stem's strided convolutions.
        focus_grad_to_encoder: whether the losses on ``q`` reach the encoders (default False).
        geometry: what a layer sees of a slide (``smt_monai.data.magnification``): ``"physical"``, a fixed
            um/px per layer, or ``"tissue"``, layer 1 on the square around the tissue.
        layer3_mpp: um/px of the images layer 3 reads (``read_size`` px); layer ``l`` reads at
            ``layer3_mpp * grid**(3 - l)``. 1.0 for both presets: the paper preset's 2048 px inputs are then
            at 0.25 um/px (40x) before the stem's pooling.
        slide_head: a learned aggregation: gated-attention pooling (``GatedAttentionPool``) of the class-token
            embeddings of a slide's layer-3 regions into the slide's class logits, trained on the slide labels
            beside the layers (``aggregation: learned``); off by default, where the slide prediction is the
            ``max`` or ``mean`` of the regions' probabilities.
        risk_head: a prognosis head: the same pooling into one number per slide, its risk (log hazard
            ratio), trained by the Cox partial likelihood on the datalist's survival ``time`` and ``event``
            (``smt_monai.losses.survival``); the slide's ``risk`` in the outputs, the concordance index's
            ranking. Off by default (prognosis as classes, the paper's setting).
        spread_focus: layer 1's K picks are never neighbours (``smt_monai.focus.selection.select_regions``),
            in training and at inference: a suspicious region spans several layer-1 patches and tumour looks
            like its mimics there, so one large mimic could otherwise take every pick. Off by default (the
            paper's top-K); layer 2 always takes its plain top-K, whose picks should lie on the tumour.
    """

    grid: int = 8
    patch_size: int = 256
    num_classes: int = 2
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    in_channels: int = 3
    dropout_rate: float = 0.0
    stem_pool: int = 4
    stem_channels: Sequence[int] = (32, 128)
    stem_strides: Sequence[int] = (4, 4)
    focus_grad_to_encoder: bool = False
    geometry: str = "physical"
    layer3_mpp: float = 1.0
    slide_head: bool = False
    risk_head: bool = False
    spread_focus: bool = False

    def __post_init__(self) -> None:
        # Configs arrive from YAML/JSON with lists; keep the frozen config hashable and comparable.
        object.__setattr__(self, "stem_channels", tuple(self.stem_channels))
        object.__setattr__(self, "stem_strides", tuple(self.stem_strides))


CARD_KEY = "smt_monai"
"""The key of the model card in a ``model.pt`` (see ``smt_monai.inference.model``), beside ``"model"``."""

SCALE_FIELDS = ("geometry", "layer3_mpp")
"""``SMTConfig`` fields that say how the model sees a slide rather than how a layer is built."""
SLIDE_FIELDS = ("slide_head", "risk_head")
"""``SMTConfig`` fields of what comes after the layers."""
FOCUS_FIELDS = ("spread_focus",)
"""``SMTConfig`` fields of how the cascade reads the focusing predictions."""

PRESETS: dict[str, SMTConfig] = {
    "paper": SMTConfig(),
    "tiny": SMTConfig(
        grid=4,
        patch_size=16,
        embed_dim=64,
        depth=2,
        num_heads=4,
        stem_pool=2,
        stem_channels=(16, 32),
        stem_strides=(2, 2),
    ),
}


class SMT(nn.Module):
    """Three SMT layers built from one config.

    Args:
        preset: name of the base config in ``PRESETS`` (``"paper"`` or ``"tiny"``).
        config: a full config instead of a preset (``preset`` is then ignored).
        pretrained: a ViT checkpoint (timm, DeiT or DINO layout; ``.pth``/``.pt``/``.safetensors``) whose
            transformer initialises the layers in ``pretrained_layers`` after their random initialisation (the
            paper's ImageNet start, Sec. 4.1); stems, heads and focusing predictors stay as initialised. See
            ``smt_monai.networks.pretrained``.
        pretrained_layers: which layers (1, 2, 3) take the ``pretrained`` weights.
        **overrides: ``SMTConfig`` fields that replace the base config's, e.g. ``grid=16, num_classes=6``.

    Raises:
        ValueError: if ``preset`` is unknown or ``pretrained_layers`` names no layer 1, 2 or 3.
        TypeError: if an override is not an ``SMTConfig`` field.
        PretrainedWeightsError: ``pretrained`` is missing, unreadable, or does not fit the layers.
    """

    def __init__(
        self,
        preset: str = "paper",
        config: SMTConfig | None = None,
        pretrained: str | os.PathLike | None = None,
        pretrained_layers: Sequence[int] = (1, 2, 3),
        **overrides: Any,
    ):
        super().__init__()
        if config is None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
            config = PRESETS[preset]
        config = dataclasses.replace(config, **overrides)
        self.config = config
        self.grid = config.grid
        self.input_size = config.grid * config.patch_size
        self.read_size = self.input_size // config.stem_pool
        self.geometry = config.geometry
        self.layer3_mpp = float(config.layer3_mpp)
        self.spread_focus = bool(config.spread_focus)
        self.card = ""  # the model card as JSON once trained weights are loaded (smt_monai.inference.model)
        layer_kwargs = {
            f.name: getattr(config, f.name)
            for f in dataclasses.fields(config)
            if f.name not in SCALE_FIELDS + SLIDE_FIELDS + FOCUS_FIELDS
        }
        self.layer1 = SMTLayer(**layer_kwargs, focus=True)
        self.layer2 = SMTLayer(**layer_kwargs, focus=True)
        self.layer3 = SMTLayer(**layer_kwargs, focus=False)
        # slide-level heads over the K^2 layer-3 class-token embeddings: class logits, and a risk
        width = max(config.embed_dim // 2, 16)
        self.slide_head = (
            GatedAttentionPool(config.embed_dim, config.num_classes, width) if config.slide_head else None
        )
        self.risk_head = GatedAttentionPool(config.embed_dim, 1, width) if config.risk_head else None
        if pretrained is not None:
            load_pretrained(self, pretrained, pretrained_layers)

    @torch.jit.export
    def layer_output(self, x: torch.Tensor, layer: int = 1) -> LayerOutput:
        """Run layer ``layer`` (1, 2 or 3) on normalised images ``x`` of shape ``(B, 3, side, side)``.

        ``side`` is ``read_size`` (what the readers deliver) or ``input_size`` (pooled in the stem).
        """
        if layer == 1:
            return self.layer1(x)
        if layer == 2:
            return self.layer2(x)
        if layer == 3:
            return self.layer3(x)
        raise ValueError(f"layer must be 1, 2 or 3, got {layer}")

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load weights from a state dict, or from the content of a ``model.pt`` (weights under ``"model"``
        beside the model card), so MONAI's ``ckpt_export`` and the model zoo's checks take ``model.pt`` as
        it is, without ``key_in_ckpt``."""
        if CARD_KEY in state_dict and "model" in state_dict:
            state_dict = state_dict["model"]
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor, layer: int = 1) -> torch.Tensor:
        """The class probabilities ``(B, num_classes)`` of layer ``layer`` on images ``x``: the network as
        one module (the model zoo's input/output check, ``network_data_format``). A slide's prediction is the
        cascade's (``smt_monai.cascade``), which runs the layers itself."""
        return self.layer_output(x, layer).probs


def smt_paper(**overrides: Any) -> SMT:
    """The paper's SMT: depth 12, 6 heads, width 384, grid 8, patch 256 (``overrides`` as in ``SMT``)."""
    return SMT(preset="paper", **overrides)


def smt_tiny(**overrides: Any) -> SMT:
    """A tiny SMT for tests and CPU demos: width 64, depth 2, 4 heads, grid 4, patch 16."""
    return SMT(preset="tiny", **overrides)
