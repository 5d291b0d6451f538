"""Tests of the per-slide result writers: QuPath measurements in focus.geojson, the overlay's colours and
focus-map stretch, and the gallery of the regions that decided the slide (K = 8, grid 8: 64 layer-3 boxes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from smt_monai.cascade import SlidePrediction
from smt_monai.data.geometry import child_boxes
from smt_monai.inference.writers import (
    FOCUS_CMAP,
    GALLERY_TILE_PX,
    PROBABILITY_CMAP,
    focus_heat,
    gallery,
    overlay_figure,
    top_regions,
    write_gallery,
    write_geojson,
    write_overlay,
)

GRID = K = 8
SIDE = 512  # the layer-1 view
SLIDE = 16384  # level-0 side; the layer-1 square is the whole slide


def prediction(p3: np.ndarray, focus_map: np.ndarray | None = None, classes: int = 2) -> SlidePrediction:
    """A hand-made cascade result: layer 2 on the first K patches of the middle rows, layer 3 on patches
    9..16 of each layer-2 region (row 1 and 2 of its grid), with last-layer P(positive) ``p3``."""
    box1 = np.array([[0.0, 0.0, float(SLIDE)]])
    box2 = child_boxes(box1, np.arange(24, 24 + K)[None], GRID).reshape(-1, 3)
    box3 = child_boxes(box2, np.tile(np.arange(9, 9 + K), (K, 1)), GRID).reshape(-1, 3)

    def probs(p: np.ndarray) -> np.ndarray:  # the positive mass p shared equally by the positive classes
        return np.stack([1 - p, *[p / (classes - 1)] * (classes - 1)], axis=1)

    p2 = np.linspace(0.9, 0.2, K)
    focus_map = np.linspace(0, 1, GRID * GRID).reshape(GRID, GRID) if focus_map is None else focus_map
    return SlidePrediction(
        fields=tissue_image()[None],
        probs=probs(p3[[np.argmax(p3)]])[0],
        layer_probs=[probs(np.array([0.4]))[0], probs(p2[:1])[0], probs(p3[[np.argmax(p3)]])[0]],
        boxes=[box1, box2, box3],
        region_probs=[probs(np.array([0.4])), probs(p2), probs(p3)],
        focus=[np.full(1, np.nan), np.linspace(0.99, 0.9, K), np.tile(np.linspace(0.8, 0.1, K), K)],
        rank=[np.zeros(1, dtype=np.int64), np.arange(K), np.tile(np.arange(K), K)],
        parent=[np.full(1, -1), np.zeros(K, dtype=np.int64), np.repeat(np.arange(K), K)],
        focus_map=focus_map[None],
    )


def tissue_image() -> np.ndarray:
    """Pink tissue over the whole view but its top rows of patches (glass)."""
    image = np.full((SIDE, SIDE, 3), (226, 160, 196), dtype=np.uint8)
    image[: SIDE // 4] = 242
    return image


P3 = np.full(K * K, 0.3)
P3[[0, 9, 20]] = (0.99, 0.98, 0.97)  # the three numbered regions
P3[5], P3[6] = 0.9, 0.05  # a high and a low region, not numbered


def test_geojson_carries_qupath_measurements_and_classes(tmp_path: Path) -> None:
    path = tmp_path / "focus.geojson"
    pred = prediction(P3)
    write_geojson(pred, SLIDE, SLIDE, path)
    text = path.read_text()
    assert "NaN" not in text
    features = json.loads(text)["features"]
    assert len(features) == 1 + K + K * K
    by_layer = {
        layer: [f["properties"] for f in features if f["properties"]["layer"] == layer] for layer in (1, 2, 3)
    }
    for layer, rows in by_layer.items():
        assert len(rows) == len(pred.boxes[layer - 1])
        for row, props in enumerate(rows):
            measurements = props["measurements"]
            assert set(measurements) == {"P(positive)", "layer", "rank"} | ({"q"} if layer > 1 else set())
            assert measurements["P(positive)"] == pytest.approx(
                pred.region_probs[layer - 1][row, 1], abs=1e-6
            )
            assert (measurements["layer"], measurements["rank"]) == (layer, pred.rank[layer - 1][row])
            if layer > 1:
                assert measurements["q"] == pytest.approx(pred.focus[layer - 1][row], abs=1e-6)
            assert props["classification"]["name"] == f"SMT layer {layer}"
            assert len(props["classification"]["color"]) == 3 and len(props["color"]) == 3
            assert props["objectType"] == "annotation"
    layer3 = by_layer[3]
    assert [layer3[i]["name"][:3] for i in (0, 9, 20)] == ["#1 ", "#2 ", "#3 "]
    assert sum(p["name"].startswith("#") for p in layer3) == 3
    assert layer3[5]["color"][0] > layer3[6]["color"][0] and layer3[5]["color"][2] < layer3[6]["color"][2]

    write_geojson(prediction(P3, classes=3), SLIDE, SLIDE, tmp_path / "graded.geojson")
    graded_props = json.loads((tmp_path / "graded.geojson").read_text())["features"][-1]["properties"]
    assert {"P(class 1)", "P(class 2)", "predicted class"} <= set(graded_props["measurements"])
    assert graded_props["predicted_class"] == f"class {graded_props['measurements']['predicted class']}"


def pixel(fig, ax, xy: tuple[float, float]) -> tuple[int, int]:
    """PNG (row, column) of data point ``xy`` of ``ax`` in ``fig`` saved at its own dpi."""
    fig.draw_without_rendering()  # places the axes as drawing does (equal aspect)
    x, y = ax.transData.transform(xy)
    return int(round(fig.bbox.height - y)), int(round(x))


def centre(pred: SlidePrediction, row: int) -> tuple[float, float]:
    """Centre of the last layer's region ``row`` in level-0 pixels (the overlay's coordinates)."""
    x, y, size = pred.boxes[-1][row]
    return x + size / 2, y + size / 2


def test_overlay_colours_regions_by_probability_and_stretches_the_focus_map(tmp_path: Path) -> None:
    """Layer-3 regions are coloured by P(positive), the three highest numbered; a focus map whose q spans
    only 0.50 to 0.51 still runs from the lowest to the highest colour."""
    step = SLIDE / GRID  # a layer-1 patch, level-0 px
    pred = prediction(P3, focus_map=np.linspace(0.50, 0.51, GRID * GRID).reshape(GRID, GRID))
    title = "slide_0.svs: P(positive) = 0.990, label 1"
    write_overlay(pred, tmp_path / "overlay.png", title=title)
    png = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB")).astype(int)
    fig = overlay_figure(pred, title=title)  # the same figure, for its coordinates
    assert png.shape[:2] == (int(fig.bbox.height), int(fig.bbox.width))
    looked, found = fig.axes[:2]

    high = png[pixel(fig, found, centre(pred, 5))]
    low = png[pixel(fig, found, centre(pred, 6))]
    assert high[0] - low[0] > 80 and low[2] - high[2] > 60, (high, low)  # red against blue
    assert sorted(t.get_text() for t in found.texts) == ["1", "2", "3"]

    lowest = png[
        pixel(fig, looked, (step * 0.5, step * 2.5))
    ]  # first tissue patch, left of the layer-2 boxes
    highest = png[pixel(fig, looked, (step * 7.5, step * 7.5))]
    glass = png[pixel(fig, looked, (step * 0.5, step * 0.5))]
    assert np.abs(highest - lowest).sum() > 120, (lowest, highest)
    assert (glass >= 235).all(), glass  # the focus map leaves the background uncoloured

    assert title in fig.texts[0].get_text()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("colour = P(positive)" in t for t in legend) and any("numbered" in t for t in legend)


@pytest.mark.parametrize("low, high", [(0.50, 0.51), (0.0, 1.0)])
def test_focus_heat_spans_the_colour_map_over_the_tissue(low: float, high: float) -> None:
    """q in [0.50, 0.51] and q in [0, 1] both span the colour map; glass patches are not coloured."""
    focus_map = np.linspace(low, high, GRID * GRID).reshape(GRID, GRID)
    tissue = np.ones((GRID, GRID), dtype=bool)
    tissue[:2] = False
    focus_map[0, 0] = high + 5  # on glass: neither stretches the range nor shows
    rgba, (lo, hi) = focus_heat(focus_map, tissue)
    assert (lo, hi) == pytest.approx((focus_map[2, 0], high))
    cmap = colormaps[FOCUS_CMAP]
    np.testing.assert_allclose(rgba[2, 0, :3], cmap(0.0)[:3])
    np.testing.assert_allclose(rgba[-1, -1, :3], cmap(1.0)[:3])
    assert (rgba[:2, :, 3] == 0).all() and rgba[-1, -1, 3] > rgba[2, 0, 3] > 0


def test_gallery_shows_the_top_regions_labelled(tmp_path: Path) -> None:
    pred = prediction(P3)
    reads: list[tuple[float, float, float]] = []

    def read_region(box: tuple[float, float, float]) -> np.ndarray:
        reads.append(box)
        shade = 40 + 20 * len(reads)  # tile n is uniform grey 40 + 20 n
        return np.full((96, 96, 3), shade, dtype=np.uint8)

    write_gallery(pred, read_region, tmp_path / "gallery.jpg", top=8, mpp=0.25, title="slide_0.svs")
    chosen = top_regions(pred, 8)
    assert [tuple(b) for b in reads] == [tuple(pred.boxes[-1][r]) for r in chosen]
    assert list(chosen[:3]) == [0, 9, 20] and 5 in chosen and 6 not in chosen
    saved = Image.open(tmp_path / "gallery.jpg")
    assert saved.format == "JPEG"
    jpeg = np.asarray(saved.convert("RGB")).astype(int)

    reads.clear()
    shown = gallery(pred, read_region, top=8, mpp=0.25, title="slide_0.svs")
    assert shown.image.shape == jpeg.shape and shown.image.shape[1] > 4 * GALLERY_TILE_PX  # four to a row
    assert shown.rows == list(chosen)
    cmap = colormaps[PROBABILITY_CMAP]
    for n, (row, (x0, y0)) in enumerate(zip(chosen, shown.corners), start=1):
        assert shown.titles[n - 1] == f"#{n}   P(positive) {P3[row]:.3f}"
        x, y, size = pred.boxes[-1][row]
        assert f"x {x:,.0f}, y {y:,.0f} px" in shown.captions[n - 1]
        assert f"x {x * 0.25:,.0f}, y {y * 0.25:,.0f} um; side {size * 0.25:,.0f} um" in shown.captions[n - 1]
        middle = (y0 + GALLERY_TILE_PX // 2, x0 + GALLERY_TILE_PX // 2)
        assert (shown.image[middle] == 40 + 20 * n).all(), (n, shown.image[middle])  # the read, enlarged
        assert (abs(jpeg[middle] - (40 + 20 * n)) <= 2).all()  # the JPEG: within 2 of the grey
        frame = shown.image[y0 - 2, x0 + 10]  # the frame: the tile's P(positive) on the overlay's colour bar
        assert list(frame) == [round(255 * c) for c in cmap(float(P3[row]))[:3]], (n, frame)

    level0 = np.zeros((2048, 2048, 3), dtype=np.uint8)  # a layer-3 region read at full resolution
    three = gallery(pred, lambda box: level0, top=3)
    for x0, y0 in three.corners:  # reduced to the tile's pixels: black inside, frame colour around
        assert not three.image[y0 : y0 + GALLERY_TILE_PX, x0 : x0 + GALLERY_TILE_PX].any()
    assert three.image.shape[1] < shown.image.shape[1]  # one row of three tiles


def test_the_focus_map_of_several_fields_is_one_map_over_the_slide(tmp_path: Path) -> None:
    """Two fields side by side: the overlay and the NIfTI focus map place each field's patches at their
    level-0 position (one patch-sized cell per layer-1 patch)."""
    import nibabel as nib

    from smt_monai.inference.writers import focus_raster, write_focus_map

    pred = prediction(P3)
    pred.boxes[0] = np.array([[0.0, 0.0, float(SLIDE)], [float(SLIDE), 0.0, float(SLIDE)]])
    pred.fields = np.concatenate([tissue_image()[None]] * 2)
    maps = np.stack([np.zeros((GRID, GRID)), np.ones((GRID, GRID))])
    pred.focus_map = maps
    values, step = focus_raster(pred, maps)
    assert values.shape == (GRID, 2 * GRID) and step == SLIDE / GRID
    assert (values[:, :GRID] == 0).all() and (values[:, GRID:] == 1).all()
    write_focus_map(pred, 0.5, tmp_path / "focus.nii.gz")
    image = nib.load(tmp_path / "focus.nii.gz")
    assert image.shape[:2] == (2 * GRID, GRID) and image.affine[0, 0] == pytest.approx(step * 0.5 / 1000)
    write_overlay(pred, tmp_path / "overlay.png", title="two fields")
    assert overlay_figure(pred).axes[0].get_xlim() == pytest.approx((0, 2 * SLIDE))


def test_graded_regions_are_coloured_and_named_by_their_predicted_grade(tmp_path: Path) -> None:
    """A grading model (4 classes): each region's predicted grade names its GeoJSON feature and colours it,
    and the overlay's legend lists the grades with their region counts."""
    pred = prediction(P3, classes=4)
    pred.class_names = ["benign", "grade 1", "grade 2", "grade 3"]
    pred.region_probs[-1] = np.tile(np.eye(4)[[0, 3, 2, 0]], (K * K // 4, 1)) * 0.6 + 0.1
    write_geojson(pred, SLIDE, SLIDE, tmp_path / "graded.geojson")
    layer3 = [f["properties"] for f in json.loads((tmp_path / "graded.geojson").read_text())["features"]][
        -K * K :
    ]
    assert [p["predicted_class"] for p in layer3[:4]] == ["benign", "grade 3", "grade 2", "benign"]
    assert "grade 3 (P 0.70)" in layer3[1]["name"] and layer3[1]["measurements"]["predicted class"] == 3
    assert {"P(grade 1)", "P(grade 2)", "P(grade 3)"} <= set(layer3[1]["measurements"])
    assert layer3[1]["color"][0] > layer3[0]["color"][0] and layer3[1]["color"][2] < layer3[0]["color"][2]
    legend = [t.get_text() for t in overlay_figure(pred).legends[0].get_texts()]
    assert [
        f"benign ({K * K // 2})",
        "grade 1 (0)",
        f"grade 2 ({K * K // 4})",
        f"grade 3 ({K * K // 4})",
    ] == legend[-5:-1]
