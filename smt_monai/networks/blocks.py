"""Pre-norm transformer blocks of the SMT layer encoders.

Both follow MONAI's ``TransformerBlock`` (``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, MONAI's
``MLPBlock``). They are assembled here rather than taken from ``TransformerBlock`` because that block always
creates a cross-attention LayerNorm, parameters that never get a gradient (a distributed-training error
unless unused parameters are searched for); and because the first block must return its attention matrix
(``AttentionWithWeights``), which MONAI's ``SABlock`` keeps only detached.
"""

import torch
import torch.nn as nn
from monai.networks.blocks import MLPBlock, SABlock

from smt_monai.networks.attention import AttentionWithWeights


class AttentionExposingBlock(nn.Module):
    """Pre-norm transformer block (as MONAI's ``TransformerBlock``) that returns its attention matrix.

    Args:
        hidden_size: token width.
        mlp_dim: hidden width of the MLP (MONAI's ``MLPBlock``).
        num_heads: number of attention heads.
        dropout_rate: dropout in attention and MLP.
        qkv_bias: whether the query/key/value projection has a bias.
    """

    def __init__(
        self, hidden_size: int, mlp_dim: int, num_heads: int, dropout_rate: float = 0.0, qkv_bias: bool = True
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = AttentionWithWeights(hidden_size, num_heads, dropout_rate, qkv_bias)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = MLPBlock(hidden_size, mlp_dim, dropout_rate)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the block output ``(B, T, hidden_size)`` and the attention ``(B, heads, T, T)`` of Eq. 2."""
        attended, alpha = self.attn(self.norm1(x))
        x = x + attended
        x = x + self.mlp(self.norm2(x))
        return x, alpha


class EncoderBlock(nn.Module):
    """Pre-norm transformer block with MONAI's ``SABlock`` attention (blocks 2..depth of a layer).

    Args:
        hidden_size: token width.
        mlp_dim: hidden width of the MLP.
        num_heads: number of attention heads.
        dropout_rate: dropout in attention and MLP. MONAI's fused attention kernel applies its dropout even
            in eval mode, so the fused kernel is used only when this is 0.
        qkv_bias: whether the query/key/value projection has a bias.
    """

    def __init__(
        self, hidden_size: int, mlp_dim: int, num_heads: int, dropout_rate: float = 0.0, qkv_bias: bool = True
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = SABlock(
            hidden_size, num_heads, dropout_rate, qkv_bias=qkv_bias, use_flash_attention=dropout_rate == 0.0
        )
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = MLPBlock(hidden_size, mlp_dim, dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, T, hidden_size)`` tokens to ``(B, T, hidden_size)``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
