"""Per-slide results in the formats pathologists and their tools open.

- ``focus.geojson``: the focused boxes of all three layers as a QuPath-importable FeatureCollection in level-0
  pixel coordinates (clipped to the slide). Each feature carries QuPath's ``classification`` (one class per
  layer), ``measurements`` (``P(positive)``, ``q``, ``layer``, ``rank``; for grading also each class's
  probability and the predicted class), a ``color`` from P(positive) (for grading, from the predicted grade),
  and the same numbers as plain properties for scripts (``layer``, ``rank``, ``parent``, ``focus``,
  ``probability``, ``predicted_class``: the region's predicted class name).
- ``overlay.png``: two views of layer 1's fields of view, in level-0 coordinates. Left, where the model
  looked: the layer-1 focus map as a heat map stretched over the tissue patches, with the layer-2 regions it
  chose. Right, what it found: the last layer's regions coloured by P(positive) on a colour bar (for grading,
  by predicted grade, with a legend of the grades), the ``marked`` highest numbered.
- ``gallery.jpg``: the last layer's regions of highest P(positive) read from the slide, each labelled with its
  number (the overlay's), P(positive) and level-0 position (and micrometres when the mpp is known): the cells
  that decided the slide.
- ``focus_map.nii.gz``: the layer-1 focus map of all fields as NIfTI, its affine giving the physical size of
  a patch (millimetres when the slide's mpp is known, level-0 pixels otherwise).

Every file is written to a temporary name and renamed, so a crash never leaves a half-written result.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smt_monai.cascade.prediction import SlidePrediction, predicted_classes
from smt_monai.data.tissue import patch_tissue
from smt_monai.utils import atomic_path

LAYER_COLOURS = {1: (0.2, 0.6, 1.0), 2: (1.0, 0.85, 0.0), 3: (1.0, 0.1, 0.1)}
PROBABILITY_CMAP = "RdYlBu_r"  # P(positive): blue (0) to red (1), readable with red-green colour blindness
FOCUS_CMAP = "viridis"  # focus q: yellow at the top stands out on H&E's pinks and purples
JPEG_QUALITY = 90  # the gallery's: the quality slide viewers and QuPath export tissue images at
GALLERY_TILE_PX = 512  # a gallery tile's side in pixels
# The gallery's layout in pixels: a tile's frame, the margin around it, and the bands of the picture's title,
# a tile's title and its caption.
_FRAME, _MARGIN, _HEADER, _TILE_TITLE, _CAPTION = 6, 16, 52, 34, 58

RegionReader = Callable[[tuple[float, float, float]], np.ndarray]
"""``(x, y, size)`` level-0 box -> ``(H, W, 3)`` uint8 RGB image of it."""


def _positive(probs: np.ndarray) -> np.ndarray:
    return probs[:, 1:].sum(axis=1)


def _graded(prediction: SlidePrediction) -> bool:
    """Whether the model has more than two classes (grading): regions are then shown by predicted class."""
    return prediction.region_probs[-1].shape[1] > 2


def _class_names(prediction: SlidePrediction) -> list[str]:
    count = prediction.region_probs[-1].shape[1]
    return (
        list(prediction.class_names)
        if len(prediction.class_names) == count
        else [f"class {c}" for c in range(count)]
    )


def class_colour(cls: int, count: int) -> tuple[float, ...]:
    """Colour of class ``cls`` of ``count`` on the P(positive) colour map: class 0 blue, the highest red."""
    from matplotlib import colormaps

    return colormaps[PROBABILITY_CMAP](cls / max(count - 1, 1))


def clip_box(box: np.ndarray, width: int, height: int) -> tuple[float, float, float, float]:
    """``(x, y, size)`` to corners ``(x0, y0, x1, y1)`` inside a ``width`` x ``height`` slide."""
    x, y, size = (float(v) for v in box)
    return max(0.0, x), max(0.0, y), min(float(width), x + size), min(float(height), y + size)


def top_regions(prediction: SlidePrediction, top: int) -> np.ndarray:
    """Rows of the last layer's regions with the highest P(positive), highest first (at most ``top``).

    The overlay numbers these regions and the gallery shows them in this order, so number ``n`` is the same
    region in both (and in the GeoJSON names).
    """
    positive = _positive(prediction.region_probs[-1])
    return np.argsort(-positive, kind="stable")[: max(0, top)]


def _rgb255(colour: tuple[float, ...]) -> list[int]:
    return [int(round(255 * c)) for c in colour[:3]]


def focus_geojson(prediction: SlidePrediction, width: int, height: int, marked: int = 3) -> dict:
    """The FeatureCollection of the focused boxes, in QuPath's GeoJSON conventions.

    Followed from QuPath's reader (``qupath.lib.io.PathObjectTypeAdapters``, QuPath 0.4 and later):
    ``properties.objectType`` ``"annotation"``; ``properties.name``; ``properties.color`` as ``[r, g, b]``
    (0-255, drawn instead of the class colour); ``properties.classification`` as ``{"name", "color"}``;
    ``properties.isLocked``; ``properties.measurements`` as an object of name -> number (QuPath reads it
    into the object's measurement list, shown in its measurement tables; the list form
    ``[{"name", "value"}]`` is QuPath 0.3's). Coordinates are level-0 pixels with the origin at the top left,
    as QuPath's (qupath-docs, "Exporting annotations"). QuPath reads measurements as numbers and JSON has no
    NaN, so a value that is not a number (``q`` of layer 1, which no parent chose) is left out of the
    measurements (the plain ``focus`` property is null).

    Measurements: ``P(positive)`` (``sum_{c>0} p_c``), ``q`` (the parent patch's focus that chose the
    region), ``layer`` and ``rank`` (0 = the highest ``q`` among the regions one parent chose); when there are
    more than two classes (grading), ``P(<class name>)`` of each positive class and ``predicted class`` (its
    index; the name is the ``predicted_class`` property and in the feature's name).

    Args:
        prediction: the slide's cascade result.
        width: slide width in level-0 pixels (boxes are clipped to it).
        height: slide height in level-0 pixels.
        marked: the last layer's regions of highest P(positive) named with their number, as in the overlay
            and gallery.
    """
    from matplotlib import colormaps

    cmap = colormaps[PROBABILITY_CMAP]
    numbers = {int(row): n for n, row in enumerate(top_regions(prediction, marked), start=1)}
    last = len(prediction.boxes)
    names, graded = _class_names(prediction), _graded(prediction)
    features = []
    for layer, boxes in enumerate(prediction.boxes, start=1):
        probs = prediction.region_probs[layer - 1]
        positive = _positive(probs)
        classes = predicted_classes(probs, prediction.threshold)
        for row, box in enumerate(boxes):
            x0, y0, x1, y1 = clip_box(box, width, height)
            p = round(float(positive[row]), 6)
            focus = float(prediction.focus[layer - 1][row])
            q = None if math.isnan(focus) else round(focus, 6)
            rank = int(prediction.rank[layer - 1][row])
            cls = int(classes[row])
            measurements = _measurements(p, probs[row], names, q, layer, rank)
            if graded:
                name = f"layer {layer}: {names[cls]} (P {float(probs[row, cls]):.2f})"
                colour = class_colour(cls, len(names))
            else:
                name, colour = f"layer {layer}: P(positive) {p:.2f}", cmap(p)
            if layer == last and row in numbers:
                name = f"#{numbers[row]} {name}"
            features.append(
                {
                    "type": "Feature",
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
                    },
                    "properties": {
                        "objectType": "annotation",
                        "name": name,
                        "color": _rgb255(colour),
                        "classification": {
                            "name": f"SMT layer {layer}",
                            "color": _rgb255(LAYER_COLOURS[layer]),
                        },
                        "isLocked": True,
                        "measurements": measurements,
                        "layer": layer,
                        "rank": rank,
                        "parent": int(prediction.parent[layer - 1][row]),
                        "focus": q,
                        "probability": p,
                        "predicted_class": names[cls],
                    },
                }
            )
    return {"type": "FeatureCollection", "features": features}


def _measurements(
    p: float, probs: np.ndarray, names: list[str], q: float | None, layer: int, rank: int
) -> dict[str, float]:
    """QuPath measurements of one region: P(positive) ``p``, class probabilities ``(C,)`` named ``names``
    (see ``focus_geojson``)."""
    measurements = {"P(positive)": p}
    if len(probs) > 2:
        measurements.update({f"P({names[c]})": round(float(probs[c]), 6) for c in range(1, len(probs))})
        measurements["predicted class"] = int(np.argmax(probs))
    if q is not None:
        measurements["q"] = q
    measurements.update(layer=layer, rank=rank)
    return measurements


def write_geojson(
    prediction: SlidePrediction, width: int, height: int, path: str | os.PathLike, marked: int = 3
) -> None:
    """Write :func:`focus_geojson` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(focus_geojson(prediction, width, height, marked)))


def focus_raster(
    prediction: SlidePrediction, per_patch: np.ndarray, fill: float = 0.0
) -> tuple[np.ndarray, float]:
    """Layer-1 per-patch values ``(F, grid, grid)`` of all fields as one map over the fields' union box.

    Cell ``(row, col)`` of the map is the patch-sized square at level-0 ``(x0 + col * step, y0 + row *
    step)``, ``(x0, y0)`` the union box's corner and ``step`` a patch's side; it takes the value of the field
    patch under its centre, ``fill`` where no field lies (fields of one slide share their side).

    Returns:
        ``(map (rows, cols), step)``.
    """
    fields = np.asarray(prediction.boxes[0], dtype=np.float64)
    grid = per_patch.shape[-1]
    step = float(fields[0, 2]) / grid
    x0, y0 = fields[:, 0].min(), fields[:, 1].min()
    cols = int(math.ceil(round((fields[:, 0] + fields[:, 2]).max() - x0, 6) / step))
    rows = int(math.ceil(round((fields[:, 1] + fields[:, 2]).max() - y0, 6) / step))
    out = np.full((rows, cols), fill, dtype=np.float64)
    cy, cx = np.mgrid[0:rows, 0:cols]
    px, py = x0 + (cx + 0.5) * step, y0 + (cy + 0.5) * step
    for (fx, fy, side), values in zip(fields, per_patch):
        col, row = np.floor((px - fx) / step).astype(int), np.floor((py - fy) / step).astype(int)
        inside = (col >= 0) & (col < grid) & (row >= 0) & (row < grid) & (px < fx + side) & (py < fy + side)
        out[inside] = values[row[inside], col[inside]]
    return out, step


def write_focus_map(prediction: SlidePrediction, mpp: float | None, path: str | os.PathLike) -> None:
    """Save the layer-1 focus map (q of every layer-1 patch, all fields together: ``focus_raster``) as NIfTI
    with its spatial scale in the affine.

    Voxel ``(i, j)`` is the patch-sized cell in column ``i``, row ``j`` over the fields' union box (0 off the
    fields); the affine maps it to level-0 position times mpp in millimetres (or level-0 pixels when mpp is
    unknown).
    """
    import nibabel as nib

    if prediction.focus_map is None:
        raise ValueError("this prediction has no layer-1 focus map")
    values, step_px = focus_raster(prediction, prediction.focus_map)
    x0, y0 = (float(v) for v in np.asarray(prediction.boxes[0])[:, :2].min(axis=0))
    scale = mpp / 1000.0 if mpp else 1.0
    step = step_px * scale
    affine = np.diag([step, step, 1.0, 1.0])
    affine[:3, 3] = [(x0 + step_px / 2) * scale, (y0 + step_px / 2) * scale, 0.0]
    image = nib.Nifti1Image(values.T[:, :, None].astype(np.float32), affine)
    image.header.set_xyzt_units(xyz="mm" if mpp else "unknown")
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(image, str(tmp))


def focus_heat(focus_map: np.ndarray, tissue: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """The layer-1 focus map as an RGBA heat map, stretched over the tissue patches.

    ``q`` is min-max scaled over the tissue patches (all patches when none has tissue), so a map whose ``q``
    spans 0.50 to 0.51 uses the whole colour map as one spanning 0 to 1 does: what the overlay shows is
    where layer 1 looked, relative to the rest of the tissue. Opacity grows with the scaled ``q`` and is zero
    off the tissue, so the background and the least focused tissue stay visible.

    Returns:
        ``(rgba (grid, grid, 4), (q_min, q_max))``, the range the colours span.
    """
    from matplotlib import colormaps

    q = np.asarray(focus_map, dtype=np.float64)
    on = tissue if tissue.any() else np.ones_like(tissue)
    lo, hi = float(q[on].min()), float(q[on].max())
    scaled = np.clip((q - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.full_like(q, 0.5)
    rgba = colormaps[FOCUS_CMAP](scaled)
    rgba[..., 3] = np.where(on, 0.05 + 0.5 * scaled, 0.0)
    return rgba, (lo, hi)


def overlay_figure(prediction: SlidePrediction, title: str = "", marked: int = 3):
    """The overlay's matplotlib figure (see the module docstring; ``write_overlay`` saves it), drawn in
    level-0 coordinates over layer 1's fields of view (``prediction.fields``).

    Args:
        prediction: the slide's cascade result.
        title: figure title (slide name, P(positive), label).
        marked: how many of the last layer's regions of highest P(positive) are outlined and numbered.
    """
    from matplotlib.figure import Figure

    if prediction.fields is None:
        raise ValueError("this prediction carries no layer-1 images")
    fig = Figure(figsize=(16, 8.8), dpi=100)
    fig.suptitle(title, fontsize=13)
    looked = fig.add_axes((0.01, 0.1, 0.43, 0.8))
    found = fig.add_axes((0.5, 0.1, 0.43, 0.8))
    fields = np.asarray(prediction.boxes[0], dtype=np.float64)
    for ax in (looked, found):
        for (x, y, side), image in zip(fields, prediction.fields):
            ax.imshow(image, interpolation="antialiased", extent=(x, x + side, y + side, y))
        ax.set_xlim(fields[:, 0].min(), (fields[:, 0] + fields[:, 2]).max())
        ax.set_ylim((fields[:, 1] + fields[:, 2]).max(), fields[:, 1].min())
        ax.set_axis_off()
    handles = _draw_where_looked(fig, looked, prediction)
    handles += _draw_what_found(fig, found, prediction, marked)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=10, frameon=False)
    return fig


def _outline(ax, box: tuple[float, float, float], widths: tuple[float, float]) -> None:
    """A black line with a white one inside it around ``box``: visible on tissue and on glass."""
    from matplotlib.patches import Rectangle

    x, y, size = box
    for lw, colour in zip(widths, ("black", "white")):
        ax.add_patch(Rectangle((x, y), size, size, fill=False, lw=lw, ec=colour))


def _draw_where_looked(fig, ax, prediction: SlidePrediction) -> list:
    """Left panel: the stretched layer-1 focus heat map and the layer-2 regions with their P(positive)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch

    ax.set_title("Where layer 1 looked: focus q and the regions it chose", fontsize=11)
    if prediction.focus_map is not None and prediction.fields is not None:
        grid = prediction.focus_map.shape[-1]
        images = torch.from_numpy(np.ascontiguousarray(prediction.fields)).permute(0, 3, 1, 2)
        tissue = patch_tissue(images, grid).reshape(-1, grid, grid).numpy()
        focus, step = focus_raster(prediction, prediction.focus_map)
        on_tissue, _ = focus_raster(prediction, tissue.astype(np.float64))
        heat, (lo, hi) = focus_heat(focus, on_tissue > 0.5)
        x0, y0 = np.asarray(prediction.boxes[0])[:, :2].min(axis=0)
        rows, cols = focus.shape
        ax.imshow(heat, interpolation="nearest", extent=(x0, x0 + cols * step, y0 + rows * step, y0))
        scale = ScalarMappable(Normalize(lo, hi), colormaps[FOCUS_CMAP])
        bar = fig.colorbar(scale, cax=fig.add_axes((0.445, 0.15, 0.01, 0.7)))
        bar.set_label("layer-1 focus q (stretched over the tissue patches)")
    if len(prediction.boxes) < 2:
        return []
    positive = _positive(prediction.region_probs[1])
    label_box = {"facecolor": "black", "alpha": 0.6, "pad": 1.2, "lw": 0}
    for row, (x, y, size) in enumerate(prediction.boxes[1]):
        _outline(ax, (x, y, size), (3.0, 1.4))
        ax.text(x + 3, y + 3, f"{positive[row]:.2f}", color="white", fontsize=8, va="top", bbox=label_box)
    return [Patch(fill=False, ec="black", lw=1.5, label=f"layer-2 region ({len(positive)}), its P(positive)")]


def _draw_what_found(fig, ax, prediction: SlidePrediction, marked: int) -> list:
    """Right panel: the last layer's regions filled by P(positive), the ``marked`` highest numbered."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    graded = _graded(prediction)
    ax.set_title(
        f"What the last layer found: its regions by {'grade' if graded else 'P(positive)'}", fontsize=11
    )
    if len(prediction.boxes) < 2:
        return []
    for x, y, size in prediction.boxes[1]:
        ax.add_patch(Rectangle((x, y), size, size, fill=False, lw=0.8, ec="white", ls="--"))
    cmap = colormaps[PROBABILITY_CMAP]
    probs = prediction.region_probs[-1]
    positive = _positive(probs)
    names = _class_names(prediction)
    classes = predicted_classes(probs, prediction.threshold)
    for row, (x, y, size) in enumerate(prediction.boxes[-1]):
        colour = class_colour(int(classes[row]), len(names)) if graded else cmap(float(positive[row]))
        ax.add_patch(Rectangle((x, y), size, size, fc=(*colour[:3], 0.6), ec=colour, lw=1.0))
    badge = {"boxstyle": "circle,pad=0.25", "fc": "black", "ec": "white", "lw": 1.2}
    chosen = top_regions(prediction, marked)
    for n, row in enumerate(chosen, start=1):
        x, y, size = prediction.boxes[-1][row]
        _outline(ax, (x, y, size), (4.0, 1.8))
        ax.annotate(
            str(n),
            (x + size, y),
            xytext=(6, 6),
            textcoords="offset points",
            fontsize=11,
            fontweight="bold",
            color="white",
            ha="left",
            va="bottom",
            bbox=badge,
        )
    numbered = f"the {len(chosen)} of highest P(positive), numbered as in the gallery"
    marker = Line2D([], [], marker="s", ms=11, mfc="none", mec="black", mew=2.5, ls="none", label=numbered)
    if graded:  # one swatch per grade, with how many layer-3 regions the model gave it
        counts = np.bincount(classes, minlength=len(names))
        swatches = [
            Patch(
                fc=(*class_colour(c, len(names))[:3], 0.6), ec=class_colour(c, len(names)), label=f"{n} ({k})"
            )
            for c, (n, k) in enumerate(zip(names, counts, strict=True))
        ]
        return [*swatches, marker]
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap), cax=fig.add_axes((0.935, 0.15, 0.01, 0.7)))
    bar.set_label("P(positive) of the region")
    swatch = cmap(0.85)
    regions = f"layer-{len(prediction.boxes)} region ({len(positive)}), colour = P(positive)"
    return [Patch(fc=(*swatch[:3], 0.6), ec=swatch, label=regions), marker]


def write_overlay(
    prediction: SlidePrediction, path: str | os.PathLike, title: str = "", marked: int = 3
) -> None:
    """Save :func:`overlay_figure` as a PNG at ``path``."""
    _save(overlay_figure(prediction, title, marked), path)


@dataclass
class Gallery:
    """The gallery picture (:func:`gallery`) and what each of its tiles shows, in the tiles' order."""

    image: np.ndarray  # (H, W, 3) uint8
    rows: list[int]  # the last layer's region of each tile
    titles: list[str]  # above each tile: its number and P(positive)
    captions: list[str]  # under each tile: its level-0 position and side (and in um)
    corners: list[tuple[int, int]]  # the top-left pixel (x, y) of each tile's image on the picture


def gallery(
    prediction: SlidePrediction,
    read_region: RegionReader,
    top: int = 8,
    mpp: float | None = None,
    title: str = "",
) -> Gallery:
    """The last layer's ``top`` regions of highest P(positive), read from the slide: the cells that decided
    the slide.

    Tiles are in the order of :func:`top_regions` (number ``n`` is the overlay's number ``n``), four to a
    row, each ``GALLERY_TILE_PX`` square, labelled with its number, P(positive), level-0 position and side in
    pixels and, with ``mpp``, in micrometres; its frame has its P(positive) colour from the overlay's colour
    bar. Composed with PIL rather than matplotlib, which took 0.6 s to rasterise the tiles of one slide.

    Args:
        prediction: the slide's cascade result.
        read_region: reads one level-0 box ``(x, y, size)`` as an ``(H, W, 3)`` uint8 RGB image, e.g. from
            the slide's level 0; a tile shows ``GALLERY_TILE_PX`` pixels, so reading more adds none.
        top: how many regions (fewer when the layer has fewer).
        mpp: level-0 micrometres per pixel, for positions in micrometres.
        title: the picture's title (slide name, P(positive), label).
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    chosen = [int(row) for row in top_regions(prediction, top)]
    positive = _positive(prediction.region_probs[-1])
    cmap = colormaps[PROBABILITY_CMAP]
    columns = max(1, min(4, len(chosen)))
    lines = max(1, math.ceil(len(chosen) / columns))
    framed = GALLERY_TILE_PX + 2 * _FRAME
    cell_w, cell_h = framed + 2 * _MARGIN, _TILE_TITLE + framed + _CAPTION + _MARGIN
    canvas = np.full((_HEADER + lines * cell_h, columns * cell_w, 3), 255, dtype=np.uint8)
    shown = Gallery(canvas, chosen, [], [], [])
    for n, row in enumerate(chosen):
        x, y, size = (float(v) for v in prediction.boxes[-1][row])
        left = n % columns * cell_w + _MARGIN
        top_px = _HEADER + n // columns * cell_h + _TILE_TITLE
        canvas[top_px : top_px + framed, left : left + framed] = _rgb255(cmap(float(positive[row])))
        corner = (left + _FRAME, top_px + _FRAME)
        tile = _fit(np.asarray(read_region((x, y, size))), GALLERY_TILE_PX)
        canvas[corner[1] : corner[1] + GALLERY_TILE_PX, corner[0] : corner[0] + GALLERY_TILE_PX] = tile
        where = f"level 0: x {x:,.0f}, y {y:,.0f} px; side {size:,.0f} px"
        if mpp:
            where += f"\nx {x * mpp:,.0f}, y {y * mpp:,.0f} um; side {size * mpp:,.0f} um"
        shown.titles.append(f"#{n + 1}   P(positive) {positive[row]:.3f}")
        shown.captions.append(where)
        shown.corners.append(corner)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    draw.text(
        (canvas.shape[1] / 2, 12), title or "Regions of highest P(positive)", (0, 0, 0), _font(26), "ma"
    )
    for (cx, cy), heading, caption in zip(shown.corners, shown.titles, shown.captions):
        middle = cx + GALLERY_TILE_PX / 2
        draw.text((middle, cy - _FRAME - 26), heading, (0, 0, 0), _font(22, bold=True), "ma")
        below = cy + GALLERY_TILE_PX + _FRAME + 6
        draw.multiline_text((middle, below), caption, (0, 0, 0), _font(18), "ma", spacing=4, align="center")
    shown.image = np.asarray(picture)
    return shown


def write_gallery(
    prediction: SlidePrediction,
    read_region: RegionReader,
    path: str | os.PathLike,
    top: int = 8,
    mpp: float | None = None,
    title: str = "",
) -> None:
    """Save :func:`gallery`'s picture at ``path`` (``gallery.jpg``: a JPEG; a ``.png`` name: a PNG)."""
    _save(gallery(prediction, read_region, top, mpp, title).image, path)


@functools.cache
def _font(size: int, bold: bool = False):
    """DejaVu Sans at ``size`` px, the font matplotlib ships and draws the overlay with."""
    from matplotlib import font_manager
    from PIL import ImageFont

    face = font_manager.FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal")
    return ImageFont.truetype(font_manager.findfont(face), size)


def _fit(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` resized to ``side`` x ``side`` pixels: area-averaged when larger (a region read at full
    resolution), bilinear when smaller."""
    from PIL import Image

    tile = Image.fromarray(np.ascontiguousarray(image[..., :3], dtype=np.uint8))
    if tile.size == (side, side):
        return np.asarray(tile)
    larger = max(tile.size) > side
    return np.asarray(
        tile.resize((side, side), Image.Resampling.BOX if larger else Image.Resampling.BILINEAR)
    )


def _save(picture, path: str | os.PathLike) -> None:
    """Write ``picture`` at ``path``, atomically: a ``matplotlib.figure.Figure`` as a PNG, an ``(H, W, 3)``
    uint8 array as a JPEG (quality ``JPEG_QUALITY``) where the name ends in ``.jpg``, else a PNG.

    The gallery is photographs of tissue, which PNG compresses poorly: its picture took 1.3 s to encode as a
    2.9 MB PNG against 0.02 s for a 0.65 MB JPEG, longer than predicting the slide; the overlay is drawn
    lines and colour fields, where PNG is small and exact. The figures are made without pyplot: no global
    state, nothing to close, and writers may run in threads.
    """
    from PIL import Image

    with atomic_path(path) as tmp:
        if not isinstance(picture, np.ndarray):
            picture.savefig(tmp, format="png")
        elif Path(path).suffix.lower() in (".jpg", ".jpeg"):
            Image.fromarray(picture).save(tmp, format="JPEG", quality=JPEG_QUALITY)
        else:
            Image.fromarray(picture).save(tmp, format="PNG")
