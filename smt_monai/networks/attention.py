"""The self-attention whose attention matrix Eq. 2 differentiates against.

Eq. 2 of the paper scores input token ``i`` by the gradient of the positive-class probability mass with
respect to the attention weights ``alpha_{j,i}`` of the FIRST encoder block, where output token ``j`` is
``b_j^out = sum_i alpha_{j,i} b_i^in``. MONAI's ``SABlock(save_attn=True)`` keeps only a detached copy of
the attention matrix, so this attention is written out plainly and returns ``alpha`` as a live tensor of the
autograd graph. Returning it (rather than storing it on the module) keeps the module stateless and
TorchScript-compatible; at inference it is simply one more output.
"""

import torch
import torch.nn as nn


class AttentionWithWeights(nn.Module):
    """Multi-head self-attention that also returns its attention matrix.

    Args:
        hidden_size: token width.
        num_heads: number of heads; must divide ``hidden_size``.
        dropout_rate: dropout on the attention weights and on the output projection.
        qkv_bias: whether the query/key/value projection has a bias.

    Raises:
        ValueError: if ``hidden_size`` is not divisible by ``num_heads``.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout_rate: float = 0.0, qkv_bias: bool = True):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.attn_drop = nn.Dropout(dropout_rate)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.drop_output = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend over the tokens of ``x``.

        Args:
            x: ``(B, T, hidden_size)`` tokens.

        Returns:
            ``(out, alpha)``: ``out`` of shape ``(B, T, hidden_size)`` and the attention weights ``alpha``
            of shape ``(B, heads, T, T)``, ``alpha[b, h, j, i]`` being the weight of input token ``i`` in
            output token ``j`` (the ``alpha_{j,i}`` of Eq. 2), after attention dropout, i.e. exactly the
            weights that multiply the values.
        """
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        alpha = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        alpha = self.attn_drop(alpha)
        out = torch.matmul(alpha, v).transpose(1, 2).reshape(b, t, d)
        return self.drop_output(self.out_proj(out)), alpha
