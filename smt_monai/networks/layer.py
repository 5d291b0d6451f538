"""One SMT layer: the ViT^[l] encoder of Sec. 3.1-3.2 with its classification head and focusing predictor.

A layer reads a ``grid`` x ``grid`` mosaic of patches (``grid * patch_size`` pixels a side), embeds each patch
with ``PatchStem``, prepends a class token, adds learned position embeddings and runs ``depth`` pre-norm
transformer blocks: first ``AttentionExposingBlock`` (its attention ``alpha`` feeds Eq. 2), then
``EncoderBlock``s (MONAI ``SABlock`` and ``MLPBlock``). The class token gives the logits ``z^[l]`` and
probabilities ``p^[l]`` (Eq. 1); in layers 1 and 2 the focusing predictor ``f_focus^[l]``, a small MLP with a
sigmoid, maps each patch embedding ``v_i^[l]`` to ``q_i^[l]`` (Eq. 3, 4).

The stem's first step is an average pooling by ``stem_pool``, so a layer also accepts its input already
pooled: ``read_size = grid * patch_size // stem_pool`` pixels a side, which is how the slide readers deliver
it (area-resampled, the same reduction), sparing the resize and normalisation of pixels the stem would
discard.
"""

from typing import NamedTuple

import torch
import torch.nn as nn

from smt_monai.networks.blocks import AttentionExposingBlock, EncoderBlock
from smt_monai.networks.stem import PatchStem


class LayerOutput(NamedTuple):
    """What one SMT layer returns (a TorchScript-compatible NamedTuple).

    Attributes:
        logits: ``(B, num_classes)`` class logits ``z``.
        probs: ``(B, num_classes)`` softmax probabilities ``p``; class 0 is the negative class, so
            ``sum_{c>0} p_c`` is the positive mass of Eq. 2 and Eq. 4.
        cls_embedding: ``(B, embed_dim)`` class-token output embedding ``ViT(X)`` of Eq. 5-6.
        patch_embeddings: ``(B, grid**2, embed_dim)`` patch output embeddings ``v_i``, row-major.
        q: ``(B, grid**2)`` focusing predictions in ``[0, 1]``; ``None`` for the last layer.
        attn: ``(B, heads, 1 + grid**2, 1 + grid**2)`` attention of the first block (token 0 is the class
            token); in training it carries the graph that Eq. 2 differentiates through.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    cls_embedding: torch.Tensor
    patch_embeddings: torch.Tensor
    q: torch.Tensor | None
    attn: torch.Tensor


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if autocast left it in a half type (bfloat16, float16); float32/64 unchanged."""
    if x.dtype == torch.bfloat16 or x.dtype == torch.float16:
        return x.float()
    return x


class FocusPredictor(nn.Module):
    """``f_focus``: a two-layer MLP with a sigmoid, applied to every patch embedding.

    Args:
        embed_dim: width of the patch embeddings (also the hidden width).
    """

    def __init__(self, embed_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, 1))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """Map ``(B, N, embed_dim)`` patch embeddings to ``(B, N)`` predictions ``q`` in ``[0, 1]``.

        ``q`` is float32 under bfloat16 autocast too, so that bfloat16 rounding (3 significant digits) does
        not tie the top-K ranking.
        """
        return torch.sigmoid(full_precision(self.mlp(v))).squeeze(-1)


class SMTLayer(nn.Module):
    """The network of one SMT layer.

    Args:
        grid: patches per side of the input.
        patch_size: pixels per side of one patch; the input side is ``grid * patch_size`` (``input_size``),
            or ``input_size // stem_pool`` (``read_size``) for inputs already pooled.
        num_classes: classes of the head (class 0 negative).
        embed_dim: token width.
        depth: number of transformer blocks (at least 1).
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of ``embed_dim``.
        in_channels: input channels.
        dropout_rate: dropout in attention and MLPs.
        stem_pool: average-pooling factor of the patch stem (skipped for ``read_size`` inputs).
        stem_channels: channels of the stem's strided convolutions.
        stem_strides: strides (= kernel sizes) of the stem's strided convolutions.
        focus: whether the layer has a focusing predictor (layers 1 and 2).
        focus_grad_to_encoder: if False (default), ``f_focus`` reads detached patch embeddings, so the
            losses on ``q`` (``L_F`` of Eq. 7) train the predictor only and never the encoder.

    Raises:
        ValueError: for an invalid ``depth``, a width not divisible by ``num_heads``, or a stem that does not
            divide ``patch_size``.
    """

    def __init__(
        self,
        grid: int,
        patch_size: int,
        num_classes: int = 2,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        in_channels: int = 3,
        dropout_rate: float = 0.0,
        stem_pool: int = 4,
        stem_channels: tuple[int, ...] = (32, 128),
        stem_strides: tuple[int, ...] = (4, 4),
        focus: bool = True,
        focus_grad_to_encoder: bool = False,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.grid = grid
        self.patch_size = patch_size
        self.input_size = grid * patch_size
        self.read_size = self.input_size // stem_pool
        self.focus_grad_to_encoder = focus_grad_to_encoder
        mlp_dim = int(embed_dim * mlp_ratio)

        self.stem = PatchStem(patch_size, embed_dim, in_channels, stem_pool, stem_channels, stem_strides)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.first_block = AttentionExposingBlock(embed_dim, mlp_dim, num_heads, dropout_rate, qkv_bias=True)
        self.blocks = nn.Sequential(
            *[
                EncoderBlock(embed_dim, mlp_dim, num_heads, dropout_rate, qkv_bias=True)
                for _ in range(depth - 1)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.focus_head = FocusPredictor(embed_dim) if focus else None

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear)

    def forward(self, x: torch.Tensor) -> LayerOutput:
        """Classify ``x`` and predict where to focus.

        Args:
            x: ``(B, in_channels, side, side)`` normalised images (see ``normalize_he``), ``side`` either
                ``input_size`` (pooled in the stem) or ``read_size`` (already pooled by the reader).

        Returns:
            ``LayerOutput``: logits, probs, class-token and patch embeddings, q, first-block attention.

        Raises:
            ValueError: ``x`` is not square with one of the two sides.
        """
        side = x.shape[-1]
        if x.shape[-2] != side or (side != self.input_size and side != self.read_size):
            raise ValueError(
                f"expected {self.input_size} x {self.input_size} inputs (pooled in the stem) or "
                f"{self.read_size} x {self.read_size} (already pooled), got {x.shape}"
            )
        tokens = self.stem(x, pooled=side == self.read_size)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        h = torch.cat([cls, tokens], dim=1) + self.pos_embed
        h, attn = self.first_block(h)
        h = self.norm(self.blocks(h))
        cls_embedding = h[:, 0]
        patch_embeddings = h[:, 1:]
        logits = full_precision(self.head(cls_embedding))  # under autocast too: probabilities that sum to 1
        q: torch.Tensor | None = None
        if self.focus_head is not None:
            v = patch_embeddings if self.focus_grad_to_encoder else patch_embeddings.detach()
            q = self.focus_head(v)
        return LayerOutput(logits, torch.softmax(logits, dim=-1), cls_embedding, patch_embeddings, q, attn)


def _init_linear(module: nn.Module) -> None:
    """ViT initialisation: truncated-normal (std 0.02) linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
