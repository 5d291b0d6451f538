"""Synthetic cohort: file format as cuCIM, OpenSlide and tifffile see it, determinism, the layout in
micrometres (the same specimen at any mpp), pen marks and debris, datalist, CLI, and the property SMT needs,
at 0.25 and 0.5 um/px: suspicious regions stand out at low magnification, but tumour and mimic can only be
told apart at full resolution."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from matplotlib.path import Path as MplPath

from smt_monai.data.annotations import TumourAnnotation
from smt_monai.data.synth import (
    MIMIC,
    TUMOUR,
    Appearance,
    LayoutOptions,
    PenStroke,
    SlideOptions,
    Speck,
    add_synth_arguments,
    make_cohort,
    make_scene,
    make_slide,
    run_synth,
    slide_seed,
    stratified_split,
)
from smt_monai.data.synth.pyramid import level_shapes, reduce4
from smt_monai.data.synth.render import (
    PATTERN_PERIOD,
    TileRenderer,
    poisson_disc_pattern,
    texture_block,
    texture_period,
    textures,
)
from smt_monai.data.synth.scene import FIELD_TISSUE
from smt_monai.utils import numpy_simd


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 4096-px (1 mm) positive slide at 0.25 um/px."""
    return make_slide(tmp_path_factory.mktemp("slide") / "s.tiff", 4096, seed=11, positive=True)


# ---------------------------------------------------------------------------------------------------------
# File format


def test_level_shapes_go_down_to_under_1024() -> None:
    assert level_shapes(16384, 16384) == [(16384, 16384), (4096, 4096), (1024, 1024), (256, 256)]
    assert level_shapes(100000, 100000)[-1] == (391, 391)
    assert level_shapes(5000, 3000) == [(5000, 3000), (1250, 750), (313, 188)]


def test_tifffile_sees_a_tiled_jpeg_pyramid_with_resolution(slide: dict) -> None:
    with tifffile.TiffFile(slide["image"]) as tif:
        pages = tif.pages
        assert [p.shape for p in pages] == [(4096, 4096, 3), (1024, 1024, 3), (256, 256, 3)]
        assert [int(p.subfiletype) for p in pages] == [0, 1, 1]
        for page in pages:
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert (page.tilelength, page.tilewidth) == (256, 256)
            assert page.photometric == tifffile.PHOTOMETRIC.YCBCR
        assert pages[0].resolutionunit == tifffile.RESUNIT.CENTIMETER
        assert pages[0].resolution == pytest.approx((1e4 / 0.25, 1e4 / 0.25))
        assert pages[2].resolution == pytest.approx((1e4 / 4.0, 1e4 / 4.0))
        assert [level.shape for level in tif.series[0].levels] == [
            (4096, 4096, 3),
            (1024, 1024, 3),
            (256, 256, 3),
        ]
    assert slide["levels"] == [[4096, 4096], [1024, 1024], [256, 256]]
    assert slide["downsamples"] == [1.0, 4.0, 16.0]


def test_openslide_sees_levels_downsamples_and_mpp(slide: dict) -> None:
    with openslide.OpenSlide(slide["image"]) as s:
        assert s.level_count == 3
        assert s.level_dimensions == ((4096, 4096), (1024, 1024), (256, 256))
        assert s.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.25)
        assert s.properties["openslide.vendor"] == "generic-tiff"


def test_cucim_sees_levels_downsamples_and_mpp(slide: dict) -> None:
    cucim = pytest.importorskip("cucim")
    image = cucim.CuImage(slide["image"])
    res = image.resolutions
    assert res["level_count"] == 3
    assert [tuple(d) for d in res["level_dimensions"]] == [(4096, 4096), (1024, 1024), (256, 256)]
    assert list(res["level_downsamples"]) == pytest.approx([1.0, 4.0, 16.0])
    assert image.spacing()[:2] == pytest.approx([0.25, 0.25])
    assert image.spacing_units()[:2] == ["micrometer", "micrometer"]
    region = np.asarray(image.read_region((0, 0), (256, 256), level=1))
    with openslide.OpenSlide(slide["image"]) as s:
        expected = np.asarray(s.read_region((0, 0), 1, (256, 256)).convert("RGB"))
    assert np.abs(region.astype(int) - expected).max() <= 2  # same JPEG, decoders may round differently


def test_each_level_is_the_area_average_of_level_0(slide: dict) -> None:
    with tifffile.TiffFile(slide["image"]) as tif:
        level0 = tif.pages[0].asarray()
        level1 = tif.pages[1].asarray()
        level2 = tif.pages[2].asarray()
    # JPEG noise only: compare block means, which JPEG keeps well
    for reduced, level in ((reduce4(level0), level1), (reduce4(reduce4(level0)), level2)):
        diff = reduced.astype(float) - level.astype(float)
        assert abs(diff.mean()) < 0.5
        assert np.abs(diff).mean() < 3.0


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = make_slide(tmp_path / "a.tiff", 2048, seed=5, positive=True)
    b = make_slide(tmp_path / "b.tiff", 2048, seed=5, positive=True)
    c = make_slide(tmp_path / "c.tiff", 2048, seed=6, positive=True)
    assert sha256(a["image"]) == sha256(b["image"])
    assert sha256(a["annotation"]) == sha256(b["annotation"])
    assert sha256(a["image"]) != sha256(c["image"])


@pytest.mark.slow
def test_rows_rendered_by_worker_processes_give_the_same_bytes(tmp_path: Path) -> None:
    """A big slide's rows may be rendered by several processes; the file must not change."""
    one = make_slide(tmp_path / "one.tiff", 3000, seed=5, positive=True)
    two = make_slide(tmp_path / "two.tiff", 3000, seed=5, positive=True, processes=2)
    assert sha256(one["image"]) == sha256(two["image"])


def test_synth_workers_import_neither_torch_nor_monai() -> None:
    """Worker processes import the writer afresh: on a 16-core machine, 16 processes each importing torch,
    MONAI and the slide readers held the first row back for minutes."""
    heavy = ("torch", "monai", "ignite", "cucim", "openslide", "cupy")
    code = (
        "import sys, smt_monai.data.synth.pyramid, smt_monai.data.synth.render, smt_monai.data.synth.cohort; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_odd_size_and_scanner_border(tmp_path: Path) -> None:
    options = SlideOptions(border=8, mpp=0.5)
    meta = make_slide(tmp_path / "odd.tiff", 1500, seed=1, positive=False, options=options)
    assert meta["levels"] == [[1500, 1500], [375, 375]]
    with openslide.OpenSlide(meta["image"]) as s:
        assert s.level_dimensions == ((1500, 1500), (375, 375))
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        edge = np.asarray(s.read_region((0, 700), 0, (8, 8)).convert("RGB"))
        inner = np.asarray(s.read_region((1480, 700), 0, (8, 8)).convert("RGB"))
    assert edge.mean() < 40 and inner.mean() > 200  # border black, glass white next to it


def test_nucleus_pattern_keeps_its_minimum_distance_across_the_wrap() -> None:
    spacing = 4.0  # um
    points = poisson_disc_pattern(spacing)
    # near saturation: about 0.55 of the plane covered by discs of diameter ``spacing``
    assert len(points) * np.pi * (spacing / 2) ** 2 / PATTERN_PERIOD**2 > 0.5
    # all pairs within 16 um of the corner where four periodic copies meet, wrapped into one window
    shifted = (points + 8.0) % PATTERN_PERIOD
    near = shifted[(shifted < 16).all(axis=1)]
    d = np.hypot(*(near[:, None, :] - near[None, :, :]).transpose(2, 0, 1))
    assert len(near) > 5 and d[np.triu_indices(len(near), 1)].min() >= spacing
    window = points[(points < 100).all(axis=1)]
    d = np.hypot(*(window[:, None, :] - window[None, :, :]).transpose(2, 0, 1))
    assert d[np.triu_indices(len(window), 1)].min() >= spacing


def test_textures_resampled_to_a_coarser_mpp_are_their_area_average() -> None:
    fine, coarse = textures(0.25), textures(0.5)
    assert texture_period(coarse.chromatin) == 512 and texture_period(coarse.pixel) == 1024
    for name in ("chromatin", "rough", "fibre", "nest"):
        averaged = getattr(fine, name)[:1024, :1024].reshape(512, 2, 512, 2).mean(axis=(1, 3))
        np.testing.assert_allclose(getattr(coarse, name)[:512, :512], averaged, atol=1e-5)
    assert texture_period(textures(0.3).chromatin) == 853  # any mpp: area-weighted
    # stored with a wrapped margin: a block across the period's edge is a view of the same values
    block = texture_block(coarse.fibre, 500, 400)
    assert block.base is not None and block[20, 120] == coarse.fibre[8, 8]


# ---------------------------------------------------------------------------------------------------------
# Layout, in micrometres


def test_tumour_only_in_positive_slides(slide: dict) -> None:
    for seed in range(40):
        assert all(r.kind == MIMIC for r in make_scene(seed, positive=False).regions)
        assert any(r.kind == TUMOUR for r in make_scene(seed, positive=True).regions)
    assert any(r["class"] == TUMOUR for r in slide["regions"])
    ann = TumourAnnotation.from_file(slide["annotation"])
    tumours = [r for r in slide["regions"] if r["class"] == TUMOUR]
    assert len(ann.polygons) == len(tumours)
    centres = np.array([[*r["centre"], 1.0] for r in tumours]) - [0.5, 0.5, 0]
    assert ann.overlap_fraction(centres).tolist() == [1.0] * len(tumours)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


def test_suspicious_regions_have_the_same_count_and_area_distribution_whatever_the_label() -> None:
    def stats(positive: bool, seeds: range) -> tuple[np.ndarray, np.ndarray]:
        scenes = [make_scene(s, positive) for s in seeds]
        counts = np.array([len(s.regions) for s in scenes])
        areas = np.array([sum(r.blob.area for r in s.regions) for s in scenes])
        return counts, areas

    pos_counts, pos_areas = stats(True, range(0, 200))
    neg_counts, neg_areas = stats(False, range(1000, 1200))
    assert set(pos_counts) == set(neg_counts) == {2, 3, 4}
    assert abs(pos_counts.mean() - neg_counts.mean()) < 0.2
    assert ks_statistic(pos_areas, neg_areas) < 0.19  # 0.1% critical value for n = m = 200
    # same seed, either label: the very same layout
    for seed in range(10):
        a, b = make_scene(seed, True), make_scene(seed, False)
        assert [r.blob for r in a.regions] == [r.blob for r in b.regions]


def test_physical_layout_tissue_extent_sections_and_glass_margin() -> None:
    options = LayoutOptions()
    several = LayoutOptions(tissue_extent=(6000.0, 6000.0), sections=(3, 3))
    assert sum(len(make_scene(seed, True, several).tissue) == 3 for seed in range(20)) >= 15
    for seed in range(30):
        scene = make_scene(seed, True)
        x0, y0, x1, y1 = scene.tissue_box
        assert 2000 - 1 <= max(x1 - x0, y1 - y0) <= 8000 + 1  # the extent is the tissue box's longer side
        assert (x0, y0) == pytest.approx((options.glass_margin,) * 2, abs=1.0)
        assert (scene.width, scene.height) == pytest.approx(
            (x1 + options.glass_margin, y1 + options.glass_margin)
        )
        assert 1 <= len(scene.tissue) <= 3
        assert all(b.area >= 0.1e6 for b in scene.tissue)  # 0.1 mm^2 or more: not debris
        outlines = [b.polygon(256) for b in scene.tissue]
        for i in range(len(outlines)):
            for j in range(i):
                gap = np.hypot(*(outlines[i][:, None] - outlines[j][None]).transpose(2, 0, 1)).min()
                assert gap >= options.section_gap
        for region in scene.regions:  # inside the tissue
            outline = region.blob.polygon(64)
            assert (np.max([b.signed_distance(*outline.T) for b in scene.tissue], axis=0) > 0).all()


def test_regions_have_physical_radii_whatever_the_slide_size() -> None:
    low, high = LayoutOptions().region_radius
    for seed in range(20):
        for side in (4000.0, 25000.0):  # a slide of 4 or 25 mm, at any mpp
            radii = [r.blob.radius for r in make_scene(seed, True, size=side).regions]
            assert all(r <= high for r in radii)
            if side > 4000:  # room enough: no region had to shrink
                assert all(r >= low for r in radii)
    assert low / 16.0 >= 6  # at least 12 px across at 16 um/px


def test_layout_options_set_numbers_and_sizes() -> None:
    options = LayoutOptions(suspicious_regions=(5, 5), region_radius=(80.0, 80.0), tumour_probability=1.0)
    scene = make_scene(3, True, options, size=4096.0)
    assert len(scene.regions) == 5 and all(r.kind == TUMOUR for r in scene.regions)
    assert all(r.blob.radius <= 80.0 + 1e-9 for r in scene.regions)
    with pytest.raises(ValueError, match="suspicious_regions"):
        LayoutOptions(suspicious_regions=(3, 2))
    with pytest.raises(ValueError, match="tissue_extent"):
        LayoutOptions(tissue_extent=(5000.0, 2000.0))
    with pytest.raises(ValueError, match="pen_marks"):
        LayoutOptions(pen_marks=1.5)


def test_pen_marks_and_debris_change_nothing_else_and_are_never_annotated(tmp_path: Path) -> None:
    marked = LayoutOptions(pen_marks=1.0, debris=1.0)
    for seed in range(20):
        clean, dirty = make_scene(seed, True), make_scene(seed, True, marked)
        assert clean.tissue == dirty.tissue and clean.regions == dirty.regions and clean.marks == []
        pens = [m for m in dirty.marks if isinstance(m, PenStroke)]
        specks = [m for m in dirty.marks if isinstance(m, Speck)]
        assert 1 <= len(pens) <= 3 and 1 <= len(specks) <= 6
        assert all(s.blob.area < 0.05e6 for s in specks)  # under 0.05 mm^2: debris, not tissue
    options = SlideOptions(
        layout=LayoutOptions(pen_marks=1.0, debris=1.0), look=Appearance(mimic_separation=2.0)
    )
    meta = make_slide(tmp_path / "m.tiff", 2048, seed=6, positive=True, options=options)
    scene = make_scene(6, True, options.layout, size=2048 * 0.25)
    assert meta["pen_marks"] >= 1 and meta["debris"] >= 1
    ann = TumourAnnotation.from_file(meta["annotation"])
    assert len(ann.polygons) == sum(r.kind == TUMOUR for r in scene.regions)
    # where a stroke runs over bare glass, alone, its ink is what shows
    stroke = next(m for m in scene.marks if isinstance(m, PenStroke))
    others = [m for m in scene.marks if m is not stroke]
    checked = 0
    with openslide.OpenSlide(meta["image"]) as s:
        for x, y in stroke.path:
            point = np.array([x]), np.array([y])
            alone = all(m.signed_distance(*point)[0] < -10 for m in others)
            px, py = int(x / 0.25), int(y / 0.25)
            if alone and scene.sample(FIELD_TISSUE, *point)[0] < -50 and 4 <= px < 2044 and 4 <= py < 2044:
                seen = np.asarray(s.read_region((px - 2, py - 2), 0, (4, 4)).convert("RGB")).mean((0, 1))
                ink = 242 * (1 - stroke.opacity * (1 - np.array(stroke.transmittance)))
                np.testing.assert_allclose(seen, ink, atol=12)
                checked += 1
    assert checked >= 3


def test_the_same_specimen_at_half_the_pixel_size(tmp_path: Path) -> None:
    """The same seed at 0.5 um/px is the 0.25 um/px slide with pixels twice as large: the same regions
    (in um, and in px at half the numbers), and level 0 close to the finer level 0 area-averaged 2 x 2."""
    layout = LayoutOptions(pen_marks=1.0, debris=1.0, region_radius=(60.0, 90.0))
    look = Appearance(mimic_separation=2.0)
    fine = make_slide(tmp_path / "f.tiff", 4096, 8, True, SlideOptions(layout=layout, look=look, mpp=0.25))
    coarse = make_slide(tmp_path / "c.tiff", 2048, 8, True, SlideOptions(layout=layout, look=look, mpp=0.5))
    assert [r["radius_um"] for r in fine["regions"]] == [r["radius_um"] for r in coarse["regions"]]
    np.testing.assert_allclose(
        [r["centre"] for r in fine["regions"]],
        [[2 * c for c in r["centre"]] for r in coarse["regions"]],
        atol=0.03,
    )
    assert fine["tissue_mm"] == coarse["tissue_mm"]
    a = TumourAnnotation.from_file(fine["annotation"]).polygons
    b = TumourAnnotation.from_file(coarse["annotation"]).polygons
    assert len(a) == len(b) and all(np.allclose(p, 2 * q) for p, q in zip(a, b))
    with tifffile.TiffFile(fine["image"]) as f, tifffile.TiffFile(coarse["image"]) as c:
        averaged = f.pages[0].asarray().astype(float).reshape(2048, 2, 2048, 2, 3).mean(axis=(1, 3))
        level0 = c.pages[0].asarray().astype(float)
        assert np.abs(level0 - averaged).mean() < 4.0
        assert np.corrcoef(level0.mean(-1).ravel(), averaged.mean(-1).ravel())[0, 1] > 0.9
        # 4 um/px: level 2 of the finer slide, level 1 of the coarser area-averaged 2 x 2
        low = c.pages[1].asarray().astype(float).reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
        assert np.abs(low - f.pages[2].asarray()).mean() < 1.5


def test_nuclei_at_20x_are_the_area_average_of_40x() -> None:
    """A 0.5 um/px pixel of a suspicious region is the mean of the four 0.25 um/px pixels it covers, for
    tumour and mimic nuclei alike (camera noise off): structure finer than the pixel (the tumour's
    nucleolus, granules and rim) is integrated over the pixel, not point-sampled, so a 20x scan shows
    tumour nuclei as a 40x scan area-averaged does and a model meets the same cells on both."""
    look = Appearance(mimic_separation=2.0, noise=0.0)
    scenes = [make_scene(seed, True, LayoutOptions(region_radius=(150.0, 200.0))) for seed in (0, 1)]
    kinds = set()
    for scene, region in ((s, r) for s in scenes for r in s.regions):
        fine, coarse = TileRenderer(scene, 0.25, look), TileRenderer(scene, 0.5, look)
        x0, y0 = (int(c // 64 * 64) for c in region.blob.centre)  # um: one 128 um tile at 0.5 um/px
        rows = [
            np.hstack([fine.render(4 * x0 + 256 * i, 4 * y0 + 256 * j)[0] for i in (0, 1)]) for j in (0, 1)
        ]
        averaged = np.vstack(rows).astype(float).reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
        tile = coarse.render(2 * x0, 2 * y0)[0].astype(float)
        assert np.abs(tile - averaged).mean() < 0.5  # intensity levels
        gradient = [np.abs(np.diff(t.mean(-1), axis=0)).mean() for t in (tile, averaged)]
        assert gradient[0] == pytest.approx(gradient[1], rel=0.01)
        kinds.add(region.kind)
    assert kinds == {TUMOUR, MIMIC}


# ---------------------------------------------------------------------------------------------------------
# Cohort, datalist, CLI


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cohort of ten 1024-px slides, written in this process."""
    out = tmp_path_factory.mktemp("cohort")
    assert (
        make_cohort(out, num_slides=10, size=1024, seed=3, workers=1, progress=False) == out / "datalist.json"
    )
    return out


def test_cohort_datalist_labels_and_splits(cohort: Path) -> None:
    datalist = json.loads((cohort / "datalist.json").read_text())
    entries = {name: datalist[name] for name in ("training", "validation", "testing")}
    assert (datalist["numTraining"], datalist["numValidation"], datalist["numTest"]) == (6, 2, 2)
    for name, items in entries.items():
        labels = sorted(e["label"] for e in items)
        assert labels == {"training": [0, 0, 0, 1, 1, 1], "validation": [0, 1], "testing": [0, 1]}[name]
        for e in items:
            assert set(e) == {"image", "label", "annotation"}
            assert not Path(e["image"]).is_absolute() and (cohort / e["image"]).is_file()
            assert (cohort / e["annotation"]).is_file()
            ann = TumourAnnotation.from_file(cohort / e["annotation"])
            assert ann.empty == (e["label"] == 0)
    with open(cohort / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and set(rows[0]) == {"image", "label", "split"}
    by_image = {e["image"]: (e["label"], name) for name, items in entries.items() for e in items}
    assert {r["image"]: (int(r["label"]), r["split"]) for r in rows} == by_image


def test_monai_reads_the_datalist(cohort: Path) -> None:
    from monai.data import load_decathlon_datalist

    loaded = load_decathlon_datalist(
        cohort / "datalist.json", is_segmentation=False, data_list_key="validation"
    )
    assert len(loaded) == 2
    assert all(Path(e["image"]).is_file() and Path(e["annotation"]).is_file() for e in loaded)


@pytest.mark.slow
def test_worker_processes_write_the_same_bytes(cohort: Path, tmp_path: Path) -> None:
    """Slides do not depend on the number of processes (each has its own seed)."""
    make_cohort(tmp_path, num_slides=10, size=1024, seed=3, workers=2, progress=False)
    slides = json.loads((cohort / "cohort.json").read_text())["slides"]
    for i, meta in enumerate(json.loads((tmp_path / "cohort.json").read_text())["slides"]):
        assert meta["seed"] == slide_seed(3, i) == slides[i]["seed"]
        assert sha256(tmp_path / meta["image"]) == sha256(cohort / slides[i]["image"])


def test_stratified_split_counts() -> None:
    labels = np.array([0] * 7 + [1] * 3)
    split = stratified_split(labels, (0.6, 0.2, 0.2), seed=0)
    assert [int(((split == s) & (labels == 0)).sum()) for s in range(3)] == [4, 2, 1]
    assert [int(((split == s) & (labels == 1)).sum()) for s in range(3)] == [2, 1, 0]


def test_cohort_json_records_mpp_and_the_physical_layout(cohort: Path) -> None:
    record = json.loads((cohort / "cohort.json").read_text())
    assert record["mpp"] == 0.25 and record["size"] == 1024
    assert record["options"]["layout"]["region_radius"] == [100.0, 600.0]  # um
    for meta in record["slides"]:
        assert (meta["width"], meta["height"], meta["mpp"]) == (1024, 1024, 0.25)
        assert 0 < max(meta["tissue_mm"]) <= 0.256
        assert all(0 < r["radius_um"] <= 600 for r in meta["regions"])


def test_cohort_json_records_what_the_bytes_depend_on(cohort: Path) -> None:
    """numpy's SIMD extensions on the drawing CPU and the pixel libraries' versions: a cohort drawn again
    elsewhere that differs in a few slides can be told apart."""
    import imagecodecs

    drawn_with = json.loads((cohort / "cohort.json").read_text())["drawn_with"]
    assert drawn_with == {
        "numpy": np.__version__,
        "numpy_simd": numpy_simd(),
        "imagecodecs": imagecodecs.__version__,
        "tifffile": tifffile.__version__,
    }


def test_npy_disable_cpu_features_draws_with_fewer_simd_extensions() -> None:
    """NPY_DISABLE_CPU_FEATURES, which a refused merge points to, takes numpy to fewer SIMD extensions."""
    here = numpy_simd()
    if len(here) < 2:
        pytest.skip("numpy dispatches to at most one SIMD extension beyond its baseline here")
    theirs = here[:1]
    code = "from smt_monai.utils import numpy_simd; print(' '.join(numpy_simd()))"
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": " ".join(here[1:])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == theirs


def test_cli_lays_out_slides_physically(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = add_synth_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--out", str(tmp_path / "c"), "--num-slides", "2", "--seed", "1", "--quiet", "--workers", "1"]
        + ["--tissue-mm", "0.3,0.5", "--sections", "1,1", "--regions", "3,3", "--region-radius-um", "20,30"]
        + ["--pen-marks", "1", "--debris", "1", "--low-mag-tumour-contrast", "0.5"]
    )
    assert run_synth(args) == 0
    cohort = json.loads((tmp_path / "c" / "cohort.json").read_text())
    assert cohort["size"] is None and cohort["options"]["layout"]["tissue_extent"] == [300.0, 500.0]
    assert cohort["options"]["look"]["low_mag_tumour_contrast"] == 0.5
    for meta in cohort["slides"]:
        assert len(meta["regions"]) == 3 and len(meta["sections"]) == 1
        assert meta["pen_marks"] >= 1 and meta["debris"] >= 1
        assert 0.3 - 1e-3 <= max(meta["tissue_mm"]) <= 0.5 + 1e-3
        # the slide is the tissue plus 0.5 mm of glass on each side
        assert meta["width"] * 0.25 == pytest.approx(meta["tissue_mm"][0] * 1000 + 1000, abs=0.5)
        assert meta["height"] * 0.25 == pytest.approx(meta["tissue_mm"][1] * 1000 + 1000, abs=0.5)
    assert sorted(s["label"] for s in cohort["slides"]) == [0, 1]
    for bad in (
        ["--mpp", "-1"],
        ["--size", "1024", "--mpp", "3"],
        ["--tissue-mm", "0.05,0.1"],
        ["--low-mag-tumour-contrast", "1.5"],
    ):
        assert run_synth(parser.parse_args(["--out", str(tmp_path / "d"), "--num-slides", "1", *bad])) == 2
    err = capsys.readouterr().err
    assert "mpp" in err and "tissue_extent" in err and "low_mag_tumour_contrast must lie in [0, 1]" in err


def test_a_physical_slide_too_small_for_its_mpp_is_refused(tmp_path: Path) -> None:
    options = SlideOptions(layout=LayoutOptions(tissue_extent=(200.0, 200.0), glass_margin=0.0))
    with pytest.raises(ValueError, match="at least 1024 px"):
        make_slide(tmp_path / "tiny.tiff", None, 1, True, options)


# ---------------------------------------------------------------------------------------------------------
# Low magnification finds suspicious regions but cannot tell tumour from mimic; level 0 can


def tile_features(tiles: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per tile: mean and standard deviation of each channel, gradient energy of each channel, and the
    fraction of pixels darker than each luminance threshold."""
    t = tiles.astype(np.float64)
    grad = ((np.diff(t, axis=1) ** 2).mean(axis=(1, 2)) + (np.diff(t, axis=2) ** 2).mean(axis=(1, 2))) ** 0.5
    lum = t.mean(axis=-1)
    dark = np.stack([(lum < v).mean(axis=(1, 2)) for v in thresholds], axis=1)
    return np.concatenate([t.mean(axis=(1, 2)), t.std(axis=(1, 2)), grad, dark], axis=1)


def balanced_accuracy_cv(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5) -> float:
    """Cross-validated balanced accuracy of a class-balanced linear discriminant (pooled covariance, equal
    priors, a little ridge), folds by group (a region never in training and test at once)."""
    rng = np.random.default_rng(0)
    fold_of = {}
    for label in (0, 1):
        for i, g in enumerate(rng.permutation(np.unique(groups[y == label]))):
            fold_of[g] = i % folds
    fold = np.array([fold_of[g] for g in groups])
    pred = np.zeros(len(y), dtype=int)
    for f in range(folds):
        train, test = fold != f, fold == f
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-9
        z = (x - mu) / sd
        m0, m1 = z[train & (y == 0)].mean(0), z[train & (y == 1)].mean(0)
        cov = 0.5 * (np.cov(z[train & (y == 0)].T) + np.cov(z[train & (y == 1)].T)) + 1e-2 * np.eye(
            x.shape[1]
        )
        w = np.linalg.solve(cov, m1 - m0)
        pred[test] = ((z[test] - (m0 + m1) / 2) @ w > 0).astype(int)
    return 0.5 * ((pred[y == 1] == 1).mean() + (pred[y == 0] == 0).mean())


LEAK_LAYOUT = LayoutOptions(suspicious_regions=(4, 4), region_radius=(290.0, 370.0), tumour_probability=0.5)
LEAK_SIDE = 4096.0  # um: a 4 mm slide, 16384 px at 0.25 um/px
TILE_UM = 64.0
LOW = (4, 8, 16)  # um/px: low magnification


def leak_seeds(count: int) -> list[int]:
    """Seeds of positive slides with two tumour and two mimic regions, so that every slide gives as many
    tiles of each (slide-level stain variation then says nothing about the class)."""
    seeds = (
        s
        for s in range(100, 1000)
        if sum(r.kind == TUMOUR for r in make_scene(s, True, LEAK_LAYOUT, size=LEAK_SIDE).regions) == 2
    )
    return [next(seeds) for _ in range(count)]


def at_resolution(tif: tifffile.TiffFile, mpp: float, um_per_px: float) -> np.ndarray:
    """The slide at ``um_per_px``: the coarsest pyramid level at least that fine, area-averaged by the
    whole factor that remains."""
    level = int(np.floor(np.log(um_per_px / mpp) / np.log(4) + 1e-9))
    factor = int(round(um_per_px / (mpp * 4**level)))
    image = tif.pages[level].asarray().astype(np.float64)
    h, w = image.shape[0] // factor, image.shape[1] // factor
    return image[: h * factor, : w * factor].reshape(h, factor, w, factor, 3).mean(axis=(1, 3))


def leak_tile_set(folder: Path, mpp: float, contrast: float = 0.0) -> dict:
    """Tiles of 64 um inside tumour and mimic regions (as many of each per slide) and in normal tissue,
    from three positive 4-mm slides at ``mpp`` (``low_mag_tumour_contrast`` ``contrast``): at 4, 8 and 16
    um/px, and at level 0 (the middle 32 um). The group of a tile is ``10 * slide seed + region index``."""
    # The slow drift of eosin across a slide (``tone``) is the same field whatever the class, but it gives
    # each region its own shade; with a dozen regions, those shades would decide the classifier either way.
    look = Appearance(tone=0.0, low_mag_tumour_contrast=contrast)
    options = SlideOptions(layout=LEAK_LAYOUT, look=look, mpp=mpp)
    rng = np.random.default_rng(1)
    out: dict = defaultdict(lambda: {"x": [], "cls": [], "group": []})  # "full", 4, 8, 16, ("normal", 8), ...
    origins = np.arange(0, LEAK_SIDE - TILE_UM + 1, TILE_UM)
    corners = np.array(
        [[x + dx, y + dy] for y in origins for x in origins for dx in (0, TILE_UM) for dy in (0, TILE_UM)]
    )
    grid = np.array([[x, y] for y in origins for x in origins])
    full = int(round(TILE_UM / 2 / mpp))
    for seed in leak_seeds(3):
        meta = make_slide(folder / f"{seed}.tiff", int(round(LEAK_SIDE / mpp)), seed, True, options)
        with tifffile.TiffFile(meta["image"]) as tif:
            low = {r: at_resolution(tif, mpp, r) for r in LOW}

        def low_tiles(x: float, y: float, low: dict[int, np.ndarray] = low) -> dict[int, np.ndarray]:
            return {
                r: low[r][int(y) // r : int(y + TILE_UM) // r, int(x) // r : int(x + TILE_UM) // r]
                for r in LOW
            }

        scene = make_scene(seed, True, LEAK_LAYOUT, size=LEAK_SIDE)
        per_class: dict[str, list[tuple[int, np.ndarray]]] = {TUMOUR: [], MIMIC: []}
        for n, region in enumerate(scene.regions):
            centre = np.array(region.blob.centre)
            inner = MplPath(centre + (region.blob.polygon() - centre) * 0.85)  # keep clear of the edge
            inside = inner.contains_points(corners).reshape(-1, 4).all(axis=1)
            per_class[region.kind].extend((seed * 10 + n, o) for o in grid[inside])
        keep = min(len(v) for v in per_class.values())

        def add(key: object, tile: np.ndarray, cls: str, group: int) -> None:
            out[key]["x"].append(tile)
            out[key]["cls"].append(cls)
            out[key]["group"].append(group)

        with openslide.OpenSlide(meta["image"]) as s:
            for cls, items in per_class.items():
                for i in rng.permutation(len(items))[:keep]:
                    group, (x, y) = items[i]
                    corner = (int(round((x + TILE_UM / 4) / mpp)), int(round((y + TILE_UM / 4) / mpp)))
                    add("full", np.asarray(s.read_region(corner, 0, (full, full)).convert("RGB")), cls, group)
                    for r, tile in low_tiles(x, y).items():
                        add(r, tile, cls, group)
        # normal tissue: well inside tissue, far from any region
        cx, cy = grid[:, 0] + TILE_UM / 2, grid[:, 1] + TILE_UM / 2
        normal = (
            (scene.sample(FIELD_TISSUE, cx, cy) > 2 * TILE_UM)
            & (scene.region_distance(TUMOUR, cx, cy) < -2 * TILE_UM)
            & (scene.region_distance(MIMIC, cx, cy) < -2 * TILE_UM)
        )
        for x, y in grid[rng.permutation(np.flatnonzero(normal))[:keep]]:
            for r, tile in low_tiles(x, y).items():
                add(("normal", r), tile, "normal", seed * 10 + 9)
    return {k: {f: np.array(v) for f, v in d.items()} for k, d in out.items()}


@pytest.fixture(scope="module", params=[0.25, 0.5], ids=["mpp0.25", "mpp0.5"])
def leak_tiles(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """:func:`leak_tile_set` at 0.25 and 0.5 um/px, tumour and mimic alike at low magnification."""
    return leak_tile_set(tmp_path_factory.mktemp(f"leak{request.param}"), request.param)


def leak_accuracy(data: dict[str, np.ndarray], other: dict[str, np.ndarray] | None = None) -> float:
    """Balanced accuracy of tumour vs mimic tiles, or (with ``other``) of suspicious vs ``other`` tiles.

    Tumour vs mimic: features are centred per slide first. Each slide gives as many tiles of each class, so
    this removes the slide's stain without removing class information; otherwise, with a few slides, the
    classifier learns which slide a tile comes from, and grouped cross-validation turns that into errors.
    """
    tiles, groups = data["x"], data["group"]
    y = (data["cls"] == TUMOUR).astype(int)
    if other is not None:
        tiles, groups = np.concatenate([tiles, other["x"]]), np.concatenate([groups, other["group"]])
        y = np.concatenate([np.ones(len(data["x"]), int), np.zeros(len(other["x"]), int)])
    x = tile_features(tiles, np.percentile(tiles.mean(axis=-1), [5, 20, 50]))
    if other is None:
        for slide in np.unique(groups // 10):
            x[groups // 10 == slide] -= x[groups // 10 == slide].mean(axis=0)
    return balanced_accuracy_cv(x, y, groups)


@pytest.mark.slow
def test_enough_region_tiles_for_the_leak_tests(leak_tiles: dict) -> None:
    data = leak_tiles[8]
    assert (data["cls"] == TUMOUR).sum() == (data["cls"] == MIMIC).sum() >= 100
    assert len(np.unique(data["group"])) >= 10


@pytest.mark.slow
@pytest.mark.parametrize("um_per_px", [8, 16])
def test_suspicious_regions_stand_out_at_low_magnification(leak_tiles: dict, um_per_px: int) -> None:
    assert leak_accuracy(leak_tiles[um_per_px], leak_tiles["normal", um_per_px]) >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("um_per_px", LOW)
def test_tumour_and_mimic_look_alike_at_low_magnification(leak_tiles: dict, um_per_px: int) -> None:
    assert leak_accuracy(leak_tiles[um_per_px]) <= 0.65


@pytest.mark.slow
def test_tumour_and_mimic_differ_at_full_resolution(leak_tiles: dict) -> None:
    assert leak_accuracy(leak_tiles["full"]) >= 0.95


@pytest.fixture(scope="module")
def contrast_tiles(tmp_path_factory: pytest.TempPathFactory) -> dict[float, dict]:
    """:func:`leak_tile_set` at 1 um/px (cheap: only low magnification is compared) for three contrasts."""
    return {c: leak_tile_set(tmp_path_factory.mktemp(f"contrast{c}"), 1.0, c) for c in (0.0, 0.05, 1.0)}


@pytest.mark.slow
@pytest.mark.parametrize("um_per_px", [8, 16])
def test_low_mag_tumour_contrast_opens_the_low_magnification_leak(
    contrast_tiles: dict, um_per_px: int
) -> None:
    """``--low-mag-tumour-contrast``: at 0 tumour and mimic stay alike at 8-16 um/px, above it tumour is told
    apart more and more often, at 1 nearly always."""
    accuracy = {c: leak_accuracy(tiles[um_per_px]) for c, tiles in contrast_tiles.items()}
    assert accuracy[0.0] <= 0.65
    assert accuracy[0.0] + 0.15 <= accuracy[0.05] <= accuracy[1.0]
    assert accuracy[1.0] >= 0.95
