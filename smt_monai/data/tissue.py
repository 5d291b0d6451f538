"""Tissue bounding box from a low pyramid level (Otsu on saturation, as CLAM and TIAToolbox do)."""

from __future__ import annotations

import numpy as np

from smt_monai.data.slide import Slide

# Pixels darker than this value (0-255) are scanner borders or pen, not tissue, whatever their saturation.
_MIN_VALUE = 30
# Saturation below this is glass even when Otsu's split lands lower (nearly blank slides).
_MIN_SATURATION = 20
_THUMBNAIL_SIDE = 2048


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 ``values``: the split maximising between-class variance."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    weight0 = np.cumsum(hist)
    weight1 = total - weight0
    mean0 = np.cumsum(hist * levels) / np.maximum(weight0, 1)
    mean1 = ((hist * levels).sum() - np.cumsum(hist * levels)) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(np.argmax(between))


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of a low-magnification RGB image.

    Saturation separates stained tissue from white glass and from grey or black scanner borders; Otsu picks
    the split per slide. A 3x3 majority filter removes isolated pixels (dust, JPEG noise).
    """
    rgb = rgb.astype(np.int16)
    vmax = rgb.max(axis=-1)
    vmin = rgb.min(axis=-1)
    saturation = np.where(vmax > 0, (vmax - vmin) * 255 // np.maximum(vmax, 1), 0).astype(np.uint8)
    threshold = max(otsu_threshold(saturation), _MIN_SATURATION)
    mask = (saturation > threshold) & (vmax > _MIN_VALUE)
    padded = np.pad(mask, 1).astype(np.uint8)
    h, w = mask.shape
    votes = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    return votes >= 5


def tissue_bbox(slide: Slide) -> tuple[float, float, float, float]:
    """Level-0 bounding box ``(x0, y0, x1, y1)`` of the tissue, found on the smallest pyramid level.

    When no tissue is found (a blank slide) the whole slide is returned, so that layer 1 still sees it all.
    """
    level = slide.level_count - 1
    if slide.smallest_level_image is not None:
        image = slide.smallest_level_image
    else:
        w, h = slide.level_dimensions[level]
        step = max(1, int(np.ceil(max(w, h) / _THUMBNAIL_SIDE)))
        level_ds = slide.level_downsamples[level]
        from smt_monai.data.regions import read_boxes

        side = max(w, h) * level_ds
        image = read_boxes(slide, np.array([[0.0, 0.0, side]]), max(w, h) // step)[0]
        image = image[: h // step, : w // step]
    mask = tissue_mask(image)
    width, height = slide.dimensions
    if mask.sum() < max(4, 1e-4 * mask.size):
        return (0.0, 0.0, float(width), float(height))
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    sx = width / image.shape[1]
    sy = height / image.shape[0]
    return (
        float(cols[0] * sx),
        float(rows[0] * sy),
        float(min(width, (cols[-1] + 1) * sx)),
        float(min(height, (rows[-1] + 1) * sy)),
    )
