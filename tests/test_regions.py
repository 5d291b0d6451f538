"""Tissue box, nested-region geometry, and the multi-level crop transform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import scene, write_tiff

from smt_monai.data import (
    ReadSlideRegions,
    ReadSlideRegionsd,
    child_boxes,
    open_slide,
    patch_grid_boxes,
    read_boxes,
    region_key,
    square_around,
    tissue_bbox,
)
from smt_monai.data.regions import plan_read
from smt_monai.data.tissue import tissue_mask


def test_square_around_centres_and_squares() -> None:
    box = square_around((100, 200, 300, 600))
    np.testing.assert_allclose(box, [0, 200, 400])


def test_child_boxes_nest_and_tile_the_parent() -> None:
    parent = np.array([[0.0, 0.0, 800.0]])
    kids = child_boxes(parent, np.array([[0, 3, 15]]), grid=4)
    np.testing.assert_allclose(kids[0], [[0, 0, 200], [600, 0, 200], [600, 600, 200]])
    all_kids = patch_grid_boxes(parent, grid=4)[0]
    assert all_kids.shape == (16, 3)
    assert all_kids[:, 2].sum() * 200 == pytest.approx(800 * 800)  # 16 squares of 200 tile the parent
    torch_kids = child_boxes(torch.tensor(parent), torch.tensor([[0, 3, 15]]), grid=4)
    np.testing.assert_allclose(torch_kids.numpy(), kids)
    assert region_key("s1", kids[0, 1]) == "s1@600,0,200"


def test_tissue_bbox_finds_tissue_and_ignores_black_border(tmp_path: Path) -> None:
    image = scene(1024, 1024)  # tissue in rows 256-767, columns 204-818
    image[:, :40] = 0  # black scanner border on the left
    image[-30:] = 10
    path = write_tiff(tmp_path / "border.tif", image, downsamples=(1, 4, 16))
    with open_slide(path) as slide:
        x0, y0, x1, y1 = tissue_bbox(slide, slide.mpp)
    assert abs(x0 - 204) <= 32 and abs(x1 - 819) <= 32
    assert abs(y0 - 256) <= 32 and abs(y1 - 768) <= 32


def test_tissue_bbox_of_blank_slide_is_whole_slide(tmp_path: Path) -> None:
    blank = np.full((512, 768, 3), 243, np.uint8)
    path = write_tiff(tmp_path / "blank.tif", blank, downsamples=(1, 4))
    with open_slide(path) as slide:
        assert tissue_bbox(slide, slide.mpp) == (0.0, 0.0, 768.0, 512.0)


def test_tissue_mask_on_aperio(aperio_slide: Path) -> None:
    with open_slide(aperio_slide) as slide:
        mask = tissue_mask(slide.read_level(0)[::8, ::8])
    assert 0.1 < mask.mean() < 0.6  # the real slide is mostly glass with a strip of skin


@pytest.mark.parametrize(("box_side", "expected_level"), [(4096, 2), (1024, 1), (900, 0), (256, 0)])
def test_read_uses_coarsest_sufficient_level(tmp_path: Path, box_side: int, expected_level: int) -> None:
    path = write_tiff(tmp_path / "pyr.tif", scene(4096, 4096), downsamples=(1, 4, 16), tile=128)
    with open_slide(path) as slide:
        level, _, side = plan_read(slide, np.array([0.0, 0.0, box_side]), read_size=256)
        assert level == expected_level
        assert side == pytest.approx(box_side / slide.level_downsamples[level], abs=1)
        image = read_boxes(slide, np.array([[0.0, 0.0, box_side]]), 256)[0]
        reference = slide.read_region((0, 0), 0, (box_side, box_side))
    from PIL import Image

    expected = np.asarray(Image.fromarray(reference).resize((256, 256), Image.Resampling.BOX)).astype(float)
    assert image.shape == (256, 256, 3)
    assert np.abs(image.astype(float) - expected).mean() < 6  # JPEG at each level, area resize


def test_box_leaving_the_slide_is_padded_white(tiny_slide: Path) -> None:
    with open_slide(tiny_slide) as slide:
        image = read_boxes(slide, np.array([[-512.0, -512.0, 1024.0]]), 64)[0]
    assert (image[:32] == 255).all() and (image[:, :32] == 255).all()
    assert image[40:, 40:].min() < 250


def test_a_region_far_larger_than_the_slide_costs_what_the_slide_holds(tmp_path: Path) -> None:
    """A low-magnification view of a small single-level slide (a biopsy exported flat): the region spans
    16384 px a side at level 0 (768 MiB white-padded), the slide 600 x 400 px. The read holds only the slide's
    pixels, and equals the whole padded region block-averaged and box-resized, pixel for pixel."""
    import tracemalloc

    from PIL import Image

    path = write_tiff(tmp_path / "flat.tif", scene(400, 600), downsamples=(1,), compression=None)
    boxes = np.array([[-8000.0, -7000.0, 16384.0], [-37.0, -101.0, 700.0], [100.0, 50.0, 320.0]])
    with open_slide(path) as slide:
        tracemalloc.start()
        images = read_boxes(slide, boxes, 64)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        pixels = slide.read_level(0)
    assert peak < 16 * 2**20
    for box, image in zip(boxes.astype(int), images):
        x, y, side = box
        padded = np.full((side, side, 3), 255, dtype=np.uint8)
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(600, x + side), min(400, y + side)
        padded[y0 - y : y1 - y, x0 - x : x1 - x] = pixels[y0:y1, x0:x1]
        reference = Image.fromarray(padded)
        if side // 64 >= 2:
            reference = reference.reduce(side // 64)
        np.testing.assert_array_equal(image, np.asarray(reference.resize((64, 64), Image.Resampling.BOX)))
    assert images[0].min() < 250 and (images[0][:16] == 255).all()  # the slide is there, small, amid white


@pytest.mark.parametrize("backend", ["auto", "openslide", "tifffile"])
def test_a_reduced_read_larger_than_a_band_is_read_band_by_band_to_the_same_pixels(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A low-magnification view of a large flat slide is read in bands of whole blocks (here 13 KiB, 4 to 5
    rows of 3-pixel blocks), pixel-identical to reading it at once, whatever the window's offset."""
    from smt_monai.data import slide as slide_module

    path = write_tiff(tmp_path / "flat.tif", scene(700, 900, seed=3), downsamples=(1,), tile=64)
    boxes = np.array([[-301.0, -157.0, 1350.0], [0.0, 0.0, 900.0], [17.0, 29.0, 601.0], [5.0, 640.0, 450.0]])
    with open_slide(path, backend) as slide:
        whole = read_boxes(slide, boxes, 150)
        monkeypatch.setattr(slide_module, "BAND_BYTES", 13 * 1024)
        banded = read_boxes(slide, boxes, 150)
    np.testing.assert_array_equal(banded, whole)
    assert whole[0].min() < 250 and (whole[0][:15] == 255).all()  # the slide starts 157 px down


def test_transform_pair_reads_batches(tiny_slide: Path) -> None:
    boxes = np.array([[0.0, 0.0, 256.0], [256.0, 256.0, 256.0], [512.0, 256.0, 128.0]])
    images = ReadSlideRegions(read_size=32)(str(tiny_slide), boxes)
    assert images.shape == (3, 3, 32, 32) and images.dtype == np.uint8
    single = ReadSlideRegions(read_size=32)(str(tiny_slide), boxes[1])
    np.testing.assert_array_equal(single, images[1])
    out = ReadSlideRegionsd(keys="image", box_key="box", read_size=32)(
        {"image": str(tiny_slide), "box": boxes}
    )
    np.testing.assert_array_equal(out["image"], images)
    with pytest.raises(ValueError):
        ReadSlideRegions(read_size=0)
