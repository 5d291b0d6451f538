"""Tissue on a slide, found on its smallest pyramid level: the sections as level-0 boxes.

The mask is Otsu's threshold on saturation, as CLAM and TIAToolbox take it, made at 8 um/px or coarser
(a finer smallest level is area-averaged first). Three things on a real slide then stretch a box drawn
around every mask pixel: marker ink (a blue or green stroke is as saturated as tissue), debris and dust,
and a second section. So ink on the glass is removed by colour first (hue, saturation and value rules for
blue, green and black ink), the connected components smaller than an area threshold (in mm^2 when the mpp
is known) are dropped as debris, small holes are closed, and the components that remain are grouped into
sections: fragments joined through ink (a stroke across a section can hide the tissue under it) or closer
than a gap belong to one section.

Slides whose background is dark (fluorescence, e.g. a DAPI scan) are refused: SMT models expect H&E.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from scipy import ndimage

from smt_monai.data.errors import SlideReadError
from smt_monai.data.slide import Slide

if TYPE_CHECKING:
    import torch

Box = tuple[float, float, float, float]

# Pixels darker than this value (0-255) are scanner borders or pen, not tissue, whatever their saturation.
_MIN_VALUE = 30
# Saturation below this is glass even when Otsu's split lands lower (nearly blank slides).
_MIN_SATURATION = 20
_THUMBNAIL_SIDE = 2048
# Masks are made at this resolution (um/px) or coarser: a finer smallest level is area-averaged to it, so
# that nuclei, which are dark and can be blue, are averaged into the tissue around them.
WORK_UM = 8.0
# Marker ink on glass, by hue (degrees, from - to), least saturation and least (or, for black, most)
# value (0-255). Stained tissue at low magnification is pink to purple (hue about 260-350); blue ink is
# bright where it lies on glass, hematoxylin-rich tissue darker and purpler; black ink is dark and grey.
_BLUE_INK = (190.0, 235.0, 0.35, 150)
_GREEN_INK = (70.0, 190.0, 0.2, 0)
_BLACK_INK = (90, 0.25)
# Components smaller than this are debris or dust (when the mpp is known), or smaller than this fraction
# of the thumbnail (when it is not); but never when they are at least a tenth of the largest component,
# so that a tiny specimen is still found.
MIN_SECTION_MM2 = 0.05
MIN_SECTION_FRACTION = 1e-3
_OF_LARGEST = 0.1
# Components closer than this belong to one section (um; or this fraction of the image side).
SECTION_GAP_UM = 250.0
SECTION_GAP_FRACTION = 0.01
# Median brightness (0-255) under which a thumbnail's background is dark: not a brightfield slide.
_DARK_BACKGROUND = 64


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


MIN_PATCH_TISSUE = 0.05
"""Fraction of a patch's pixels that must be tissue for the patch to be focusable (method-notes: patches
without tissue, glass or the white padding beyond a slide's edge, are never focused)."""


def patch_tissue(images: torch.Tensor, grid: int) -> torch.Tensor:
    """``(n, grid**2)`` bool: which patches of the layer inputs ``images`` (``(n, 3, side, side)`` uint8)
    hold tissue. A pixel is tissue when it is saturated as stain is (``_MIN_SATURATION``, the floor of
    :func:`tissue_mask`'s Otsu split, which needs no per-image statistics) and not dark; a patch is when at
    least ``MIN_PATCH_TISSUE`` of its pixels are, counted on a grid of 16 x 16 pixels per patch (a strided
    view: the fraction needs no more, and the check stays far cheaper than the network)."""
    import torch

    step = max(1, images.shape[-1] // (16 * grid))
    rgb = images[..., ::step, ::step].to(torch.int16)
    vmax, vmin = rgb.amax(dim=1), rgb.amin(dim=1)
    saturation = (vmax - vmin) * 255 // vmax.clamp(min=1)
    tissue = ((saturation > _MIN_SATURATION) & (vmax > _MIN_VALUE)).to(torch.float32)
    fraction = torch.nn.functional.adaptive_avg_pool2d(tissue[:, None], grid).flatten(1)
    return fraction >= MIN_PATCH_TISSUE


def ink_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of blue, green or black marker ink, grown by one pixel to take in the stroke's pale edge."""
    rgb = rgb.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    vmax, vmin = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = np.maximum(vmax - vmin, 1e-6)
    saturation = (vmax - vmin) / np.maximum(vmax, 1.0)
    hue = 60.0 * np.where(
        vmax == r,
        ((g - b) / chroma) % 6.0,
        np.where(vmax == g, (b - r) / chroma + 2.0, (r - g) / chroma + 4.0),
    )
    ink = (vmax < _BLACK_INK[0]) & (saturation < _BLACK_INK[1])
    for low, high, least, bright in (_BLUE_INK, _GREEN_INK):
        ink |= (hue >= low) & (hue < high) & (saturation >= least) & (vmax >= bright)
    return ndimage.binary_dilation(ink, structure=np.ones((3, 3), bool))


def working_image(rgb: np.ndarray, um_per_px: float | None) -> tuple[np.ndarray, int]:
    """``rgb`` area-averaged by the whole factor that brings it to ``WORK_UM`` um/px (to at most
    ``_THUMBNAIL_SIDE`` px a side when the resolution is unknown), and that factor."""
    if um_per_px is not None:
        factor = max(1, int(WORK_UM / um_per_px))
    else:
        factor = max(1, int(np.ceil(max(rgb.shape[:2]) / _THUMBNAIL_SIDE)))
    if factor == 1:
        return rgb, 1
    h, w = rgb.shape[0] // factor, rgb.shape[1] // factor
    blocks = rgb[: h * factor, : w * factor].reshape(h, factor, w, factor, 3)
    return blocks.mean(axis=(1, 3)).round().astype(np.uint8), factor


def thumbnail(slide: Slide) -> np.ndarray:
    """The slide's smallest level as RGB (read at most ``_THUMBNAIL_SIDE`` px a side when it was not
    decoded on opening)."""
    if slide.smallest_level_image is not None:
        return slide.smallest_level_image
    from smt_monai.data.regions import read_boxes

    level = slide.level_count - 1
    w, h = slide.level_dimensions[level]
    step = max(1, int(np.ceil(max(w, h) / _THUMBNAIL_SIDE)))
    side = max(w, h) * slide.level_downsamples[level]
    image = read_boxes(slide, np.array([[0.0, 0.0, side]]), max(w, h) // step)[0]
    return image[: h // step, : w // step]


def check_brightfield(slide: Slide, image: np.ndarray | None = None) -> None:
    """Refuse a slide whose background is dark (a fluorescence scan), judged on its thumbnail ``image``.

    Glass is the majority of a brightfield thumbnail and bright; a fluorescence scan is mostly black. Tissue
    colour is not used: stains vary too much.

    Raises:
        SlideReadError: the median brightness (the brightest channel) is under 64 of 255.
    """
    image = thumbnail(slide) if image is None else image
    median = float(np.median(image.max(axis=-1)))
    if median < _DARK_BACKGROUND:
        raise SlideReadError(
            slide.path,
            f"not a brightfield slide (dark background: median brightness {median:.0f} of 255 on the "
            "smallest level, as in a fluorescence scan); SMT models expect H&E",
        )


def detect_tissue(rgb: np.ndarray, um_per_px: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tissue of a low-magnification RGB image, without ink and debris: the cleaned mask, and the ink mask.

    Args:
        rgb: the thumbnail (:func:`working_image`).
        um_per_px: its resolution, when known: debris is then what is smaller than ``MIN_SECTION_MM2``.

    Returns:
        ``(tissue, ink)`` boolean masks of the image's shape.
    """
    ink = ink_mask(rgb)
    labels, count = ndimage.label(tissue_mask(rgb) & ~ink, structure=np.ones((3, 3), bool))
    if count == 0:
        return labels > 0, ink
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    if um_per_px is not None:
        least = MIN_SECTION_MM2 * 1e6 / um_per_px**2
    else:
        least = MIN_SECTION_FRACTION * labels.size
    least = min(least, _OF_LARGEST * areas.max())
    tissue = np.isin(labels, 1 + np.flatnonzero(areas >= least))
    holes = ndimage.binary_fill_holes(tissue) & ~tissue
    hole_labels, hole_count = ndimage.label(holes)
    if hole_count:
        hole_areas = np.bincount(hole_labels.ravel(), minlength=hole_count + 1)
        tissue |= (hole_areas < least)[hole_labels] & holes
    return tissue, ink


class TissueMap(NamedTuple):
    """A slide's tissue at working resolution (:func:`tissue_map`)."""

    tissue: np.ndarray  # bool mask, ink and debris removed
    ink: np.ndarray  # bool mask of marker ink
    scale: tuple[float, float]  # level-0 px per mask px, (x, y)
    um_per_px: float | None  # the mask's resolution, when the slide's mpp is known

    @property
    def blank(self) -> bool:
        """No tissue found: a blank or failed scan, or tissue too pale for the saturation threshold."""
        return bool(self.tissue.sum() < max(4, 1e-4 * self.tissue.size))

    @property
    def area_mm2(self) -> float | None:
        """The tissue's area in mm^2 (0 when :attr:`blank`; None when the slide's mpp is unknown): a biopsy
        is a few mm^2, a resection hundreds."""
        if self.blank:
            return 0.0
        return float(self.tissue.sum()) * self.um_per_px**2 / 1e6 if self.um_per_px else None


def tissue_map(slide: Slide, mpp: float | None) -> TissueMap:
    """The slide's tissue without ink and debris (:func:`detect_tissue`) on the :func:`working_image` of its
    thumbnail: what both SMT's layer-1 fields (:func:`tissue_components`) and the dense baseline's tiles
    are drawn from.

    ``mpp`` is the slide's level-0 um/px as the caller resolved it (``magnification.scan_mpp``: the file's
    value when plausible, else the user's ``--default_mpp``), or None when unknown: the file's own value is
    not trusted here, since a 72-dpi tag or a unit slip would size the debris filter by it.

    Raises:
        SlideReadError: the slide is not brightfield (:func:`check_brightfield`).
    """
    image = thumbnail(slide)
    check_brightfield(slide, image)
    width, height = slide.dimensions
    sx, sy = width / image.shape[1], height / image.shape[0]  # level-0 px per thumbnail px
    image, factor = working_image(image, mpp * sx if mpp else None)
    sx, sy = sx * factor, sy * factor
    um_per_px = mpp * (sx + sy) / 2 if mpp else None
    tissue, ink = detect_tissue(image, um_per_px)
    return TissueMap(tissue, ink, (sx, sy), um_per_px)


def tissue_components(slide: Slide, mpp: float | None, found: TissueMap | None = None) -> list[Box]:
    """Level-0 boxes ``(x0, y0, x1, y1)`` of the tissue sections, row-major by position.

    The tissue is :func:`tissue_map`'s (``mpp`` as there); its components that touch the same ink stroke,
    or lie within ``SECTION_GAP_UM`` (``SECTION_GAP_FRACTION`` of the image side when the mpp is unknown)
    of each other, are one section. When no tissue is found (a blank slide) the whole slide is the one
    section, so that layer 1 still sees it all. ``found``: the slide's map, where the caller has made it.

    Raises:
        SlideReadError: the slide is not brightfield (:func:`check_brightfield`).
    """
    found = found or tissue_map(slide, mpp)
    tissue, ink, (sx, sy), um_per_px = found
    width, height = slide.dimensions
    if found.blank:
        return [(0.0, 0.0, float(width), float(height))]
    # components joined through ink or closer than the gap are one: label the tissue grown by half the gap,
    # and the ink, together; keep the tissue pixels
    gap = SECTION_GAP_UM / um_per_px if um_per_px else SECTION_GAP_FRACTION * max(tissue.shape)
    near = ndimage.distance_transform_edt(~tissue) <= gap / 2
    labels, _ = ndimage.label(near | ink, structure=np.ones((3, 3), bool))
    labels[~tissue] = 0
    objects = [s for s in ndimage.find_objects(labels) if s is not None]
    boxes = sorted(([c.start, r.start, c.stop, r.stop] for r, c in objects), key=lambda b: (b[1], b[0]))
    return [
        (float(x0 * sx), float(y0 * sy), float(min(width, x1 * sx)), float(min(height, y1 * sy)))
        for x0, y0, x1, y1 in boxes
    ]


def tissue_bbox(slide: Slide, mpp: float | None, found: TissueMap | None = None) -> Box:
    """Level-0 bounding box ``(x0, y0, x1, y1)`` of all the tissue sections (:func:`tissue_components`, with
    its ``mpp`` and ``found``); the whole slide when none is found."""
    return bounding_box(tissue_components(slide, mpp, found))


def bounding_box(sections: list[Box]) -> Box:
    """The level-0 box ``(x0, y0, x1, y1)`` around ``sections``."""
    boxes = np.array(sections)
    return (*map(float, boxes[:, :2].min(axis=0)), *map(float, boxes[:, 2:].max(axis=0)))
