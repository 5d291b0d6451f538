"""Random flips and 90-degree rotations of a layer's inputs, with the patch outputs put back in place.

A slide has no up or left, so the eight symmetries of the square (the dihedral group D4) are free training
data. Without them the last layer memorises the few hundred regions the cascade hands it per epoch and
calls unseen benign mimics tumour; with them it learns nuclear size (docs/architecture.md, "Training
augmentation"). Inside the cascade an input may only be transformed if every per-patch output (``q``, the
Eq. 2 score, the patch embeddings) is mapped back to the untransformed grid, because the score bank, the
top-K boxes and ``L_ret`` refer to patches by their row-major index in the slide's orientation; this module
does both halves.

A transform is an integer ``t`` in 0-7: ``t % 4`` quarter turns (``torch.rot90`` over the last two
dimensions), then a left-right flip when ``t >= 4``.
"""

from __future__ import annotations

from functools import lru_cache

import torch

NUM_TRANSFORMS = 8


def random_transforms(count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(count,)`` long transforms drawn uniformly from the eight symmetries of the square."""
    return torch.randint(0, NUM_TRANSFORMS, (count,), generator=generator)


def apply_transform(image: torch.Tensor, transform: int) -> torch.Tensor:
    """Transform one ``(..., H, W)`` square image (or grid) by ``transform`` (0-7)."""
    out = torch.rot90(image, int(transform) % 4, dims=(-2, -1))
    return out.flip(-1) if int(transform) >= 4 else out


def transform_batch(images: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Transform each ``(B, C, H, W)`` image by its own transform (``transforms`` is ``(B,)``)."""
    if images.shape[0] != transforms.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {transforms.shape[0]} transforms")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be square, got {tuple(images.shape[-2:])}")
    out = torch.empty_like(images)
    for t in transforms.unique().tolist():
        rows = (transforms == t).nonzero().squeeze(1).to(images.device)
        out[rows] = apply_transform(images[rows], t)
    return out


def restore_patch_order(values: torch.Tensor, transforms: torch.Tensor, grid: int) -> torch.Tensor:
    """Put per-patch outputs of transformed inputs back in the untransformed row-major patch order.

    Args:
        values: ``(B, grid**2, ...)`` outputs indexed by the patch position in the transformed input.
        transforms: ``(B,)`` transforms that were applied to the inputs.
        grid: patches per side.

    Returns:
        ``values`` re-indexed so that entry ``i`` belongs to patch ``i`` of the untransformed input
        (differentiable: a gather).
    """
    if values.shape[:2] != (transforms.shape[0], grid * grid):
        raise ValueError(f"expected values of shape ({transforms.shape[0]}, {grid * grid}, ...)")
    index = _inverse_orders(grid)[transforms.cpu()].to(values.device)
    index = index.reshape(*index.shape, *([1] * (values.dim() - 2))).expand_as(values)
    return values.gather(1, index)


@lru_cache(maxsize=8)
def _inverse_orders(grid: int) -> torch.Tensor:
    """``(8, grid**2)``: row ``t`` gives, for each untransformed patch, its position after transform ``t``
    (the inverse of where each position's patch came from), computed once per grid."""
    cells = torch.arange(grid * grid).reshape(grid, grid)
    landed = torch.stack([apply_transform(cells, t).reshape(-1) for t in range(NUM_TRANSFORMS)])
    return landed.argsort(dim=1)
