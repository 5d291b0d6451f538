"""Geometry of SMT's three nested fields of view (method-notes, "Geometry").

A region is a square in level-0 pixel coordinates, stored as ``(x, y, size)``: top-left corner and side.
Layer 1 sees one square around the tissue; a layer-``l`` input is cut into ``grid`` x ``grid`` patches
and patch ``i`` (row-major) of region ``(x, y, s)`` is the layer-``l+1`` region
``(x + (i % grid) * s / grid, y + (i // grid) * s / grid, s / grid)``. Each step therefore magnifies by
``grid``. Coordinates stay floating point so that nested boxes tile their parent exactly; rounding happens
only when pixels are read.

The functions use only arithmetic and indexing, so they accept NumPy arrays and torch tensors alike.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

ArrayT = TypeVar("ArrayT")


def square_around(bbox: tuple[float, float, float, float], min_size: float = 1.0) -> np.ndarray:
    """The square ``(x, y, size)`` centred on ``bbox = (x0, y0, x1, y1)``, side = the longer bbox side.

    This is layer 1's field of view: the whole tissue, squared so that the layer input is not distorted.
    The square may extend past the slide; reads pad it with background white.
    """
    x0, y0, x1, y1 = (float(v) for v in bbox)
    side = max(x1 - x0, y1 - y0, float(min_size))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    return np.array([cx - side / 2.0, cy - side / 2.0, side], dtype=np.float64)


def child_boxes(parent: ArrayT, index: ArrayT, grid: int) -> ArrayT:
    """Level-0 boxes of the patches ``index`` of the regions ``parent``.

    Args:
        parent: ``(..., 3)`` boxes ``(x, y, size)``.
        index: patch indices in ``[0, grid**2)``, row-major, with shape ``(..., K)`` (same leading shape
            as ``parent``).
        grid: patches per side of a layer input.

    Returns:
        ``(..., K, 3)`` boxes of the selected patches, i.e. the next layer's regions.
    """
    parent_ = parent[..., None, :]
    step = parent_[..., 2] / grid
    col = index % grid
    row = index // grid
    x = parent_[..., 0] + col * step
    y = parent_[..., 1] + row * step
    size = step + 0 * x
    if isinstance(parent, np.ndarray):
        return np.stack([x, y, size], axis=-1)
    import torch

    return torch.stack([x, y, size], dim=-1)


def patch_grid_boxes(parent: np.ndarray, grid: int) -> np.ndarray:
    """All ``grid**2`` patch boxes of each region in ``parent`` (shape ``(..., grid**2, 3)``)."""
    parent = np.asarray(parent, dtype=np.float64)
    index = np.broadcast_to(np.arange(grid * grid), parent.shape[:-1] + (grid * grid,))
    return child_boxes(parent, index, grid)


def box_to_xyxy(box: np.ndarray) -> np.ndarray:
    """``(..., 3)`` boxes ``(x, y, size)`` to ``(..., 4)`` corners ``(x0, y0, x1, y1)``."""
    box = np.asarray(box, dtype=np.float64)
    return np.concatenate([box[..., :2], box[..., :2] + box[..., 2:3]], axis=-1)


def region_key(slide_id: str, box: np.ndarray) -> str:
    """Stable key of a region: the slide id plus its level-0 box rounded to whole pixels."""
    x, y, s = (int(round(float(v))) for v in box)
    return f"{slide_id}@{x},{y},{s}"
