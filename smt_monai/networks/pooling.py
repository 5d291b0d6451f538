"""Gated-attention pooling of a bag of instance embeddings into one prediction (Ilse et al., 2018, Eq. 9).

Two models pool with it: the dense baseline over the features of all tissue tiles of a slide, and SMT's
learned aggregation (the slide head, ``SMTConfig.slide_head``) over the class-token embeddings of the K^2
layer-3 regions, an alternative to taking the ``max`` or ``mean`` of their class probabilities.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class GatedAttentionPool(nn.Module):
    """``a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))``, ``z = sum_i a_i h_i``, logits ``= W z``.

    Args:
        feature_dim: width of the instance embeddings ``h_i``.
        num_classes: classes of the pooled prediction.
        attention_dim: hidden width of the attention network.
    """

    def __init__(self, feature_dim: int, num_classes: int, attention_dim: int = 128) -> None:
        super().__init__()
        self.attention_v = nn.Linear(feature_dim, attention_dim)
        self.attention_u = nn.Linear(feature_dim, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(1, C)`` and instance attention ``(n,)`` of one bag of embeddings ``(n, feature_dim)``."""
        gate = torch.tanh(self.attention_v(features)) * torch.sigmoid(self.attention_u(features))
        attention = torch.softmax(self.attention_w(gate).squeeze(-1), dim=0)
        embedding = (attention[:, None] * features).sum(dim=0, keepdim=True)
        return self.classifier(embedding), attention
