"""Geometry of SMT's three nested fields of view (method-notes, "Geometry").

A region is a square in level-0 pixel coordinates, stored as ``(x, y, size)``: top-left corner and side.
Layer 1 sees one square around the tissue (or, with a field of fixed physical side, the squares of
:func:`layer1_fields` that cover its sections); a layer-``l`` input is cut into ``grid`` x ``grid`` patches
and patch ``i`` (row-major) of region ``(x, y, s)`` is the layer-``l+1`` region
``(x + (i % grid) * s / grid, y + (i // grid) * s / grid, s / grid)``. Each step therefore magnifies by
``grid``. Coordinates stay floating point so that nested boxes tile their parent exactly; rounding happens
only when pixels are read.

The functions use only arithmetic and indexing, so they accept NumPy arrays and torch tensors alike.
"""

from __future__ import annotations

import math
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


def layer1_fields(components: np.ndarray, field_side: float) -> np.ndarray:
    """Layer 1's fields of view over a slide's tissue: squares ``(x, y, side)`` of ``field_side``, together
    covering every component box (method-notes, "Geometry": layer 1 sees a fixed physical side).

    Fields are chosen greedily, so their number is small but not always the least:

    - A component wider or taller than a field gets a grid of ``ceil(w / side)`` x ``ceil(h / side)``
      fields centred on it (the overhang split evenly on both sides).
    - A component that fits in a field and lies inside one of those grid fields needs no other.
    - The other components start as groups of one; the two groups whose union box has the shortest longer
      side are merged, over and over, while that side is at most a field. Each group then gets one field
      centred on its union box, so tissue smaller than a field is centred in it.

    Args:
        components: ``(N, 4)`` level-0 boxes ``(x0, y0, x1, y1)`` (e.g. ``tissue_components``).
        field_side: side of a field in level-0 px.

    Returns:
        ``(F, 3)`` float64 fields, row-major by position (by ``y``, then ``x``).
    """
    side = float(field_side)
    if not side > 0:
        raise ValueError(f"field_side must be positive, got {field_side}")
    fields: list[list[float]] = []
    groups: list[list[float]] = []
    for x0, y0, x1, y1 in np.asarray(components, dtype=np.float64).reshape(-1, 4):
        if x1 - x0 <= side and y1 - y0 <= side:
            groups.append([x0, y0, x1, y1])
            continue
        nx, ny = max(1, math.ceil((x1 - x0) / side)), max(1, math.ceil((y1 - y0) / side))
        gx, gy = (x0 + x1 - nx * side) / 2, (y0 + y1 - ny * side) / 2
        fields += [[gx + i * side, gy + j * side, side] for j in range(ny) for i in range(nx)]
    covered = [
        any(f[0] <= g[0] and f[1] <= g[1] and g[2] <= f[0] + side and g[3] <= f[1] + side for f in fields)
        for g in groups
    ]
    groups = [g for g, inside in zip(groups, covered) if not inside]
    while True:
        best: tuple[float, int, int, list[float]] | None = None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                a, b = groups[i], groups[j]
                union = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]
                longer = max(union[2] - union[0], union[3] - union[1])
                if longer <= side and (best is None or longer < best[0]):
                    best = (longer, i, j, union)
        if best is None:
            break
        _, i, j, groups[i] = best
        del groups[j]
    fields += [[(g[0] + g[2] - side) / 2, (g[1] + g[3] - side) / 2, side] for g in groups]
    out = np.array(fields, dtype=np.float64).reshape(-1, 3)
    return out[np.lexsort((out[:, 0], out[:, 1]))]


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
