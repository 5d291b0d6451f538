"""The focusing score: Eq. 2's instantaneous gradient score and Eq. 3's min-max normalisation, and the
other per-patch signals a layer could focus by (the ablations of the paper's Table 2)."""

from __future__ import annotations

import torch


def positive_mass(probs: torch.Tensor) -> torch.Tensor:
    """``sum_{c>0} p_c``, the probability of the positive classes (Eq. 2, Eq. 4); class 0 is negative.

    Args:
        probs: ``(..., C)`` class probabilities.

    Returns:
        ``(...)`` positive probability mass.
    """
    return probs[..., 1:].sum(dim=-1)


def focusing_score(probs: torch.Tensor, attn: torch.Tensor, retain_graph: bool = True) -> torch.Tensor:
    """Instantaneous focusing score ``g`` of Eq. 2, one value per patch.

    ``g_i = sum_heads sum_{j=1..L^2} d(sum_{c>0} p_c) / d alpha_{j,i}``: how much input patch ``i`` drives the
    positive mass through the patch outputs ``j`` of the first block, as Eq. 2 writes it: the class token's
    output row (``j = 0``, which carries most of the gradient: 78% on a random paper-preset layer) is not
    summed, and its input column (``i = 0``) is dropped. The gradient of the batch sum equals each sample's
    own gradient because the samples of a layer never interact (no batch norm). ``g`` is computed with
    ``torch.autograd.grad`` and is a constant (no graph).

    Args:
        probs: ``(B, C)`` probabilities of the layer (``LayerOutput.probs``).
        attn: ``(B, heads, T, T)`` first-block attention of the same forward (``LayerOutput.attn``),
            ``T = 1 + grid**2``.
        retain_graph: keep the autograd graph so that the training step can still backpropagate its losses
            afterwards (default True; pass False when ``g`` is the last use of the graph).

    Returns:
        ``(B, grid**2)`` scores in patch (row-major) order.

    Raises:
        RuntimeError: if ``attn`` carries no graph (the layer ran under ``torch.no_grad``/inference mode).
    """
    if not attn.requires_grad:
        raise RuntimeError("focusing_score needs the attention with its graph: run the layer with grad on")
    (grad,) = torch.autograd.grad(positive_mass(probs).sum(), attn, retain_graph=retain_graph)
    return grad[:, :, 1:, 1:].sum(dim=(1, 2))


def minmax_normalize(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``S~`` of Eq. 3: min-max normalise the scores of each region over its patches (last dim) to ``[0, 1]``.

    With ``valid`` (the patches that hold tissue), the minimum and maximum are taken over those patches only
    and the others map to 0: glass and padding neither stretch nor squeeze the target. A region whose scores
    are all equal (or that has no valid patch) holds no evidence for any patch; it maps to all zeros (the
    limit of Eq. 3's numerator), never to NaN.

    Args:
        scores: ``(..., N)`` accumulated scores ``S``.
        valid: optional ``(..., N)`` bool, the patches that enter the normalisation.

    Returns:
        ``(..., N)`` normalised scores.
    """
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    valid = valid.to(scores.device)
    low = torch.where(valid, scores, torch.inf).amin(dim=-1, keepdim=True)
    high = torch.where(valid, scores, -torch.inf).amax(dim=-1, keepdim=True)
    span = high - low
    scaled = (scores - low) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(valid & (span > 0), scaled.clamp(0.0, 1.0), torch.zeros_like(scores))


def class_attention(attn: torch.Tensor) -> torch.Tensor:
    """The class token's first-block attention to each patch, averaged over heads: ``(B, grid**2)``.

    The plain attention-based focusing that Table 2 of the paper compares the focusing predictor against.

    Args:
        attn: ``(B, heads, T, T)`` first-block attention (``LayerOutput.attn``), token 0 the class token.
    """
    return attn[:, :, 0, 1:].mean(dim=1)


FOCUS_SOURCES: tuple[str, ...] = ("q", "score", "attention")
"""What a layer's top-K is taken by: the focusing predictor ``q`` (SMT), the Eq. 2 score (in training the
score bank's ``S``, at inference the instantaneous ``g``), or ``class_attention``."""


def check_focus_source(focus_source: str) -> str:
    """``focus_source`` if it is one of ``FOCUS_SOURCES``; otherwise a ValueError naming the choices."""
    if focus_source not in FOCUS_SOURCES:
        raise ValueError(f"focus_source must be one of {FOCUS_SOURCES}, got {focus_source!r}")
    return focus_source
