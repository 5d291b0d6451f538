"""Tissue detection on real TIFFs written on the fly: pen ink and debris do not move the tissue box,
sections are found one by one, fluorescence scans are refused, blank slides give the whole slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import scene, write_tiff

from smt_monai.data import SlideReadError, open_slide
from smt_monai.data.synth import Appearance, LayoutOptions, SlideOptions, make_slide
from smt_monai.data.tissue import (
    check_brightfield,
    detect_tissue,
    thumbnail,
    tissue_bbox,
    tissue_components,
    tissue_map,
    working_image,
)

PINK, BLUE, GREEN, BLACK, BROWN = (225, 150, 190), (60, 100, 200), (50, 140, 80), (30, 30, 35), (150, 105, 80)


def boxes_of(path: Path) -> list[tuple[float, float, float, float]]:
    with open_slide(path) as slide:
        return tissue_components(slide, slide.mpp)


def assert_same_box(a: tuple, b: tuple, tolerance: float) -> None:
    np.testing.assert_allclose(a, b, atol=tolerance)


@pytest.mark.parametrize("ink", [BLUE, GREEN, BLACK], ids=["blue", "green", "black"])
def test_a_pen_stroke_on_the_glass_does_not_move_the_tissue_box(tmp_path: Path, ink: tuple) -> None:
    """A 6 x 30 px stroke on a 512 px thumbnail stretched the box from 120 to 320 px high."""
    image = scene(2048, 2048)  # tissue in rows 512-1535, columns 409-1638
    clean = write_tiff(tmp_path / "clean.tif", image, downsamples=(1, 4))
    image[100:220, 800:824] = ink  # 30 x 6 px at the 512 px level
    marked = write_tiff(tmp_path / "marked.tif", image, downsamples=(1, 4))
    with open_slide(clean) as a, open_slide(marked) as b:
        assert_same_box(tissue_bbox(b, b.mpp), tissue_bbox(a, a.mpp), tolerance=4.0)
        assert_same_box(tissue_bbox(a, a.mpp), (409, 512, 1639, 1536), tolerance=8.0)


@pytest.mark.parametrize("mpp", [0.5, None], ids=["mpp", "no-mpp"])
def test_debris_does_not_move_the_tissue_box(tmp_path: Path, mpp: float | None) -> None:
    image = scene(2048, 2048)
    image[1000:1012, 100:112] = BROWN  # 3 x 3 px at the 512 px level
    image[1800:1840, 1900:1940] = PINK  # a stray tissue-coloured speck, 20 x 20 um
    path = write_tiff(tmp_path / "debris.tif", image, downsamples=(1, 4), mpp=mpp)
    found = boxes_of(path)
    assert len(found) == 1
    assert_same_box(found[0], (409, 512, 1639, 1536), tolerance=8.0)


def test_two_sections_are_two_components_and_a_stroke_across_one_keeps_it_whole(tmp_path: Path) -> None:
    image = np.full((2048, 4096, 3), 242, np.uint8)
    image[400:1600, 300:1500] = PINK  # 1.2 x 1.2 mm at 1 um/px
    image[600:1400, 2400:3800] = PINK  # 0.9 mm to its right
    image[700:800, 200:1600] = BLUE  # a 100 um stroke across the first section
    path = write_tiff(tmp_path / "two.tif", image, downsamples=(1, 4, 16), mpp=1.0)
    found = boxes_of(path)
    assert len(found) == 2
    assert_same_box(found[0], (300, 400, 1500, 1600), tolerance=40.0)
    assert_same_box(found[1], (2400, 600, 3800, 1400), tolerance=40.0)
    with open_slide(path) as slide:
        assert_same_box(tissue_bbox(slide, slide.mpp), (300, 400, 3800, 1600), tolerance=40.0)


def test_fragments_of_one_section_are_one_component(tmp_path: Path) -> None:
    image = np.full((2048, 2048, 3), 242, np.uint8)
    image[400:1600, 300:900] = PINK
    image[400:1600, 1000:1600] = PINK  # 100 um apart: one torn section
    path = write_tiff(tmp_path / "torn.tif", image, downsamples=(1, 4, 16), mpp=1.0)
    found = boxes_of(path)
    assert len(found) == 1
    assert_same_box(found[0], (300, 400, 1600, 1600), tolerance=40.0)


def test_a_dark_fluorescence_slide_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = np.full((1024, 1024, 3), 8, np.uint8)
    for y, x in rng.integers(50, 970, (300, 2)):  # DAPI nuclei: bright blue on black
        image[y : y + 6, x : x + 6] = (40, 60, 230)
    path = write_tiff(tmp_path / "dapi.tif", image, downsamples=(1, 4))
    with open_slide(path) as slide:
        with pytest.raises(SlideReadError, match="not a brightfield slide .*dark background.*H&E") as err:
            tissue_bbox(slide, slide.mpp)
        assert err.value.path == str(path)
        with pytest.raises(SlideReadError, match="not a brightfield slide"):
            check_brightfield(slide)


def test_a_blank_slide_is_one_whole_slide_section(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "blank.tif", np.full((512, 768, 3), 243, np.uint8), downsamples=(1, 4))
    assert boxes_of(path) == [(0.0, 0.0, 768.0, 512.0)]


def test_the_tissue_area_is_measured_in_mm2_and_is_0_on_a_blank_slide(tmp_path: Path) -> None:
    image = np.full((3000, 4000, 3), 243, np.uint8)
    image[500:2100, 800:3200] = PINK  # 1.6 x 2.4 mm at 1 um/px
    path = write_tiff(tmp_path / "section.tif", image, downsamples=(1, 8), mpp=1.0)
    with open_slide(path) as slide:
        found = tissue_map(slide, 1.0)
        assert not found.blank and found.area_mm2 == pytest.approx(3.84, rel=0.05)
        assert tissue_map(slide, None).area_mm2 is None  # no mpp, no physical area
    blank = write_tiff(tmp_path / "blank.tif", np.full((3000, 4000, 3), 243, np.uint8), downsamples=(1, 8))
    with open_slide(blank) as slide:
        found = tissue_map(slide, 0.5)
        assert found.blank and found.area_mm2 == 0.0


def test_synthetic_sections_are_found_through_pen_marks_and_debris(tmp_path: Path) -> None:
    layout = LayoutOptions(sections=(2, 2), tissue_extent=(4000.0, 4000.0), pen_marks=1.0, debris=1.0)
    options = SlideOptions(layout=layout, look=Appearance(mimic_separation=2.0), mpp=1.0)
    meta = make_slide(tmp_path / "s.tiff", None, 2, True, options)
    assert meta["pen_marks"] >= 1 and meta["debris"] >= 1
    found = boxes_of(Path(meta["image"]))
    assert len(found) == 2
    for box, truth in zip(found, sorted(meta["sections"], key=lambda b: (b[1], b[0]))):
        assert_same_box(box, truth, tolerance=100.0)  # 100 um: a few px of the 16 um/px thumbnail


def test_real_h_and_e_is_not_taken_for_ink_and_its_box_is_the_tissue(aperio_slide: Path) -> None:
    """The Aperio test slide has one level at 0.5 um/px: nuclei there are dark and bluish, so the masks are
    made at 8 um/px, where they are averaged into the tissue."""
    with open_slide(aperio_slide) as slide:
        image, factor = working_image(thumbnail(slide), slide.mpp)
        found = tissue_components(slide, slide.mpp)
    assert factor == 16
    tissue, ink = detect_tissue(image, slide.mpp * factor)
    assert ink.sum() < 0.01 * tissue.sum()
    assert len(found) == 1
    assert_same_box(found[0], (224, 96, 1856, 2960), tolerance=64.0)
