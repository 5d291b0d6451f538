"""Per-slide results in the formats pathologists and their tools open.

- ``focus.geojson``: the focused boxes of all three layers as a QuPath-importable FeatureCollection, in
  level-0 pixel coordinates (clipped to the slide), with ``layer``, ``rank``, ``focus`` (q) and
  ``probability`` (P(positive)) properties.
- ``overlay.png``: the layer-1 view with the layer-1 focus map as a heat overlay and the boxes of layers 2
  and 3 drawn, with a legend.
- ``focus_map.nii.gz``: the layer-1 focus map as NIfTI, its affine giving the physical size of a patch
  (millimetres when the slide's mpp is known, level-0 pixels otherwise).

Every file is written to a temporary name and renamed, so a crash never leaves a half-written result.
"""

from __future__ import annotations

import json
import os

import numpy as np

from smt_monai.cascade.prediction import SlidePrediction
from smt_monai.utils import atomic_path

LAYER_COLOURS = {1: (0.2, 0.6, 1.0), 2: (1.0, 0.85, 0.0), 3: (1.0, 0.1, 0.1)}


def _positive(probs: np.ndarray) -> np.ndarray:
    return probs[:, 1:].sum(axis=1)


def clip_box(box: np.ndarray, width: int, height: int) -> tuple[float, float, float, float]:
    """``(x, y, size)`` to corners ``(x0, y0, x1, y1)`` inside a ``width`` x ``height`` slide."""
    x, y, size = (float(v) for v in box)
    return max(0.0, x), max(0.0, y), min(float(width), x + size), min(float(height), y + size)


def focus_geojson(prediction: SlidePrediction, width: int, height: int) -> dict:
    """The FeatureCollection of the focused boxes (see module docstring)."""
    features = []
    for layer, boxes in enumerate(prediction.boxes, start=1):
        colour = [int(255 * c) for c in LAYER_COLOURS[layer]]
        positive = _positive(prediction.region_probs[layer - 1])
        for row, box in enumerate(boxes):
            x0, y0, x1, y1 = clip_box(box, width, height)
            focus = float(prediction.focus[layer - 1][row])
            features.append(
                {
                    "type": "Feature",
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
                    },
                    "properties": {
                        "objectType": "annotation",
                        "name": f"layer {layer} #{int(prediction.rank[layer - 1][row]) + 1}",
                        "classification": {"name": f"SMT layer {layer}", "color": colour},
                        "layer": layer,
                        "rank": int(prediction.rank[layer - 1][row]),
                        "parent": int(prediction.parent[layer - 1][row]),
                        "focus": None if np.isnan(focus) else round(focus, 6),
                        "probability": round(float(positive[row]), 6),
                    },
                }
            )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(prediction: SlidePrediction, width: int, height: int, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(focus_geojson(prediction, width, height)))


def write_focus_map(prediction: SlidePrediction, mpp: float | None, path: str | os.PathLike) -> None:
    """Save the layer-1 focus map (``grid`` x ``grid`` q) as NIfTI with its spatial scale in the affine.

    Voxel ``(i, j)`` is the patch in column ``i``, row ``j`` of the layer-1 square; the affine maps it to
    level-0 position times mpp in millimetres (or level-0 pixels when mpp is unknown).
    """
    import nibabel as nib

    if prediction.focus_map is None:
        raise ValueError("this prediction has no layer-1 focus map")
    grid = prediction.focus_map.shape[0]
    x, y, size = (float(v) for v in prediction.boxes[0][0])
    scale = mpp / 1000.0 if mpp else 1.0
    step = size / grid * scale
    affine = np.diag([step, step, 1.0, 1.0])
    affine[:3, 3] = [(x + size / grid / 2) * scale, (y + size / grid / 2) * scale, 0.0]
    image = nib.Nifti1Image(prediction.focus_map.T[:, :, None].astype(np.float32), affine)
    image.header.set_xyzt_units(xyz="mm" if mpp else "unknown")
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(image, str(tmp))


def write_overlay(
    prediction: SlidePrediction, layer1_image: np.ndarray, path: str | os.PathLike, title: str = ""
) -> None:
    """Draw the layer-1 view with the focus heat map and the boxes of layers 2 and 3, with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    side = layer1_image.shape[0]
    x0, y0, size = (float(v) for v in prediction.boxes[0][0])
    fig, ax = plt.subplots(figsize=(8, 8.6), dpi=100)
    ax.imshow(layer1_image)
    handles = []
    if prediction.focus_map is not None:
        heat = ax.imshow(
            prediction.focus_map, cmap="inferno", alpha=0.45, vmin=0, vmax=1, extent=(0, side, side, 0)
        )
        fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.02, label="layer-1 focus q")
    for layer in (2, 3):
        if layer > len(prediction.boxes):
            break
        positive = _positive(prediction.region_probs[layer - 1])
        for row, box in enumerate(prediction.boxes[layer - 1]):
            bx = (box[0] - x0) / size * side
            by = (box[1] - y0) / size * side
            bs = box[2] / size * side
            ax.add_patch(
                Rectangle(
                    (bx, by), bs, bs, fill=False, lw=2.2 if layer == 2 else 1.2, ec=LAYER_COLOURS[layer]
                )
            )
            if layer == 2:
                ax.text(
                    bx + 2,
                    by + 2,
                    f"{positive[row]:.2f}",
                    color="white",
                    fontsize=7,
                    va="top",
                    bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "lw": 0},
                )
        label = f"layer {layer}: {len(positive)} regions"
        handles.append(Patch(fill=False, ec=LAYER_COLOURS[layer], label=label))
    ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.8)
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
