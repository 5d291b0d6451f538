"""Graded synthetic cohort (``smt-monai synth --task grading``): labels and class names in the datalist and
the GeoJSON, the slide grade as the grade of its worst region, binary slides unchanged, the share of tumour
nuclei rising with a region's grade, the same specimen at 20x and 40x, and the property grading needs:
regions of the lowest and the highest grade look alike at low magnification and differ at level 0."""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from test_synth import leak_accuracy

from smt_monai.data import load_datalist
from smt_monai.data.annotations import TumourAnnotation
from smt_monai.data.synth import (
    FOLLOW_UP_MONTHS,
    MIMIC,
    TUMOUR,
    Appearance,
    LayoutOptions,
    SlideOptions,
    TileRenderer,
    add_synth_arguments,
    label_names,
    make_cohort,
    make_scene,
    make_slide,
    run_synth,
    synthetic_survival,
)
from smt_monai.data.synth.render import _MIMIC, _TUMOUR, TILE, fit_mimic_separation
from smt_monai.data.synth.scene import Blob

GRADED = LayoutOptions(num_classes=4)
LOOK = Appearance(mimic_separation=2.0)  # no fit: these tests do not compare tumour with mimic


def geojson_classes(path: str | Path) -> list[str]:
    features = json.loads(Path(path).read_text())["features"]
    return [f["properties"]["classification"]["name"] for f in features]


# ---------------------------------------------------------------------------------------------------------
# Labels


def test_slide_grade_is_the_grade_of_its_worst_region() -> None:
    seen = set()
    for num_classes in (3, 4, 6):
        layout = LayoutOptions(num_classes=num_classes)
        for seed in range(20):
            binary = make_scene(seed, True)
            for grade in range(num_classes):
                scene = make_scene(seed, grade, layout)
                grades = [r.grade for r in scene.regions]
                assert scene.label == grade and scene.num_classes == num_classes
                assert all((r.kind == TUMOUR) == (r.grade > 0) for r in scene.regions)
                assert max(grades) == grade and min(grades) >= 0
                # the layout, and which regions are tumour, are those of the binary slide
                assert [r.blob for r in scene.regions] == [r.blob for r in binary.regions]
                if grade:
                    assert [r.kind for r in scene.regions] == [r.kind for r in binary.regions]
                    seen |= {(grade, g) for g in grades if g}
    assert {(3, 1), (3, 2), (3, 3), (5, 1), (5, 4)} <= seen  # lower grades beside the worst one
    with pytest.raises(ValueError, match=r"label must lie in 0 \.\. 3"):
        make_scene(0, 4, GRADED)
    with pytest.raises(ValueError, match="label must lie in 0 .. 1"):
        make_scene(0, 2)
    with pytest.raises(ValueError, match="num_classes"):
        LayoutOptions(num_classes=1)


def test_a_binary_slide_is_unchanged() -> None:
    """Existing binary cohorts and the shipped model depend on these slides: the layout, what is drawn at
    each point and the pixels are pinned (values from the generator before grading existed)."""
    scene = make_scene(11, True, size=1024.0)
    assert [(r.kind, r.grade, round(r.blob.radius, 3)) for r in scene.regions] == [
        (MIMIC, 0, 128.044),
        (TUMOUR, 1, 110.043),
    ]
    renderer = TileRenderer(scene, 0.25, LOOK)
    assert {k: len(v.x) for k, v in renderer.nuclei(0, 0, 4096).items()} == {0: 523, 1: 1630, 2: 1188}
    assert int(renderer.render(2048, 2048)[0].astype(np.int64).sum()) == 36933031


# ---------------------------------------------------------------------------------------------------------
# Files


@pytest.fixture(scope="module")
def graded_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nine 1024-px slides at 0.5 um/px in four classes, through the command line."""
    out = tmp_path_factory.mktemp("graded")
    parser = add_synth_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--out", str(out), "--task", "grading", "--num-slides", "9", "--size", "1024", "--mpp", "0.5"]
        + ["--seed", "2", "--workers", "1", "--quiet", "--positive-fraction", "0.1", "--survival"]
    )
    assert run_synth(args) == 0
    return out


def test_graded_cohort_labels_names_and_annotation_classes(graded_cohort: Path) -> None:
    datalist = json.loads((graded_cohort / "datalist.json").read_text())
    assert datalist["labels"] == {"0": "benign", "1": "grade 1", "2": "grade 2", "3": "grade 3"}
    assert label_names(4) == list(datalist["labels"].values()) and label_names(2) == ["negative", "tumour"]
    entries = [e for split in ("training", "validation", "testing") for e in datalist[split]]
    # balanced over the classes (--positive-fraction is for diagnosis only)
    assert sorted(e["label"] for e in entries) == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    record = json.loads((graded_cohort / "cohort.json").read_text())
    assert record["options"]["layout"]["num_classes"] == 4 and record["positive_fraction"] is None
    by_image = {Path(m["image"]).name: m for m in record["slides"]}
    for e in entries:
        meta = by_image[Path(e["image"]).name]
        assert meta["label"] == e["label"] == max(r["grade"] for r in meta["regions"])
        names = [datalist["labels"][str(r["grade"])] if r["grade"] else MIMIC for r in meta["regions"]]
        assert (
            [r["class"] for r in meta["regions"]] == names == geojson_classes(graded_cohort / e["annotation"])
        )
    colours = {
        f["properties"]["classification"]["name"]: tuple(f["properties"]["classification"]["color"])
        for e in entries
        for f in json.loads((graded_cohort / e["annotation"]).read_text())["features"]
    }
    assert set(colours) == {MIMIC, "grade 1", "grade 2", "grade 3"} and len(set(colours.values())) == 4
    with open(graded_cohort / "labels.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert sorted(int(r["label"]) for r in table) == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    # --survival: time and event per slide, in the datalist (as load_datalist reads them) and labels.csv
    assert [float(r["time"]) for r in table] == [e["time"] for e in sorted(entries, key=lambda e: e["image"])]
    loaded = load_datalist(graded_cohort / "datalist.json", "training", class_names=label_names(4))
    assert all(e["time"] > 0 and e["event"] in (0, 1) for e in loaded)
    # a grade's polygons are what the annotation reader takes for that class
    grade_3 = next(e for e in entries if e["label"] == 3)
    ann = TumourAnnotation.from_file(graded_cohort / grade_3["annotation"], frozenset({"grade 3"}))
    assert len(ann.polygons) == sum(r["grade"] == 3 for r in by_image[Path(grade_3["image"]).name]["regions"])


def test_binary_cohort_keeps_its_names(tmp_path: Path) -> None:
    make_cohort(tmp_path, 2, 1024, 1, options=SlideOptions(look=LOOK, mpp=0.5), workers=1, progress=False)
    datalist = json.loads((tmp_path / "datalist.json").read_text())
    assert datalist["labels"] == {"0": "negative", "1": "tumour"}
    positive = next(e for split in ("training", "testing") for e in datalist[split] if e["label"] == 1)
    assert set(geojson_classes(tmp_path / positive["annotation"])) <= {TUMOUR, MIMIC}
    assert TUMOUR in geojson_classes(tmp_path / positive["annotation"])


def test_cli_refuses_a_number_of_classes_that_does_not_fit_the_task(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    parser = add_synth_arguments(argparse.ArgumentParser())
    for bad in (["--task", "grading", "--num-classes", "2"], ["--num-classes", "3"]):
        assert run_synth(parser.parse_args(["--out", str(tmp_path / "x"), *bad])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "smt-monai synth: error: --task grading needs --num-classes 3 or more, got 2",
        "smt-monai synth: error: --task diagnosis has 2 classes, got --num-classes 3 "
        "(for more: --task grading)",
    ]
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------------
# Rendering


def graded_seeds(layout: LayoutOptions, grades: list[int], count: int, side: float) -> list[int]:
    """Seeds of slides of the highest grade whose regions have exactly ``grades`` (sorted)."""
    top = layout.num_classes - 1
    seeds = (
        s
        for s in range(10000)
        if sorted(r.grade for r in make_scene(s, top, layout, size=side).regions) == grades
    )
    return [next(seeds) for _ in range(count)]


def region_points(renderer: TileRenderer, index: int) -> dict[int, int]:
    """Occupied pattern points inside region ``index``, counted by kind."""
    blob, mpp = renderer.scene.regions[index].blob, renderer.mpp
    x0, y0, x1, y1 = (int(v / mpp) for v in blob.bbox())
    counts = {}
    for kind, group in renderer.nuclei(x0, y0, max(x1 - x0, y1 - y0)).items():
        inside = blob.signed_distance((group.x + x0) * mpp, (group.y + y0) * mpp) > 0
        counts[kind] = int(inside.sum())
    return counts


def test_share_of_tumour_nuclei_rises_with_the_region_grade() -> None:
    """A region of grade g holds tumour nuclei at a share (g + 1) / C of its points, mimic pairs at the
    rest; mimic regions hold mimic pairs only."""
    layout = LayoutOptions(suspicious_regions=(4, 4), region_radius=(150.0, 150.0), num_classes=4)
    (seed,) = graded_seeds(layout, [1, 2, 3, 3], 1, 2048.0)
    scene = make_scene(seed, 3, layout, size=2048.0)
    renderer = TileRenderer(scene, 0.5, LOOK)
    shares = defaultdict(list)
    for n, region in enumerate(scene.regions):
        counts = region_points(renderer, n)
        assert counts.get(_TUMOUR, 0) + counts.get(_MIMIC, 0) > 1500
        shares[region.grade].append(counts.get(_TUMOUR, 0) / (counts.get(_TUMOUR, 0) + counts.get(_MIMIC, 0)))
    for grade, values in shares.items():
        assert values == pytest.approx([(grade + 1) / 4] * len(values), abs=0.04)
    benign = make_scene(seed, 0, layout, size=2048.0)
    assert all(_TUMOUR not in region_points(TileRenderer(benign, 0.5, LOOK), n) for n in range(4))


def test_the_same_graded_specimen_at_20x_and_40x(tmp_path: Path) -> None:
    """Region boxes in um, classes and grades, and what is drawn at each point, do not depend on the mpp."""
    layout = LayoutOptions(region_radius=(60.0, 90.0), tumour_probability=1.0, num_classes=4)
    metas = [
        make_slide(
            tmp_path / f"{mpp}.tiff", int(512 / mpp), 4, 3, SlideOptions(layout=layout, look=LOOK, mpp=mpp)
        )
        for mpp in (0.25, 0.5)
    ]
    fine, coarse = ([dict(r, bbox=np.multiply(r["bbox"], m["mpp"])) for r in m["regions"]] for m in metas)
    assert [(r["class"], r["grade"]) for r in fine] == [(r["class"], r["grade"]) for r in coarse]
    assert {r["grade"] for r in fine} >= {3}
    np.testing.assert_allclose([r["bbox"] for r in fine], [r["bbox"] for r in coarse], atol=0.01)
    assert geojson_classes(metas[0]["annotation"]) == geojson_classes(metas[1]["annotation"])
    scene = make_scene(4, 3, layout, size=512.0)
    points = []
    for mpp in (0.25, 0.5):
        nuclei = TileRenderer(scene, mpp, LOOK).nuclei(0, 0, int(512 / mpp))
        points.append(
            sorted(
                (round(x * mpp, 3), round(y * mpp, 3), k)
                for k, g in nuclei.items()
                for x, y in zip(g.x, g.y, strict=True)
            )
        )
    assert points[0] == points[1]


# ---------------------------------------------------------------------------------------------------------
# Low magnification cannot tell the grade; level 0 can

GRADE_LAYOUT = LayoutOptions(
    suspicious_regions=(4, 4), region_radius=(250.0, 300.0), tumour_probability=1.0, num_classes=4
)
GRADE_SIDE = 3072.0  # um
GRADE_MPP = 0.5
TILE_UM = 64.0
LOW = (4, 8, 16)  # um/px


def region_tiles(renderer: TileRenderer, blob: Blob) -> list[np.ndarray]:
    """Level-0 tiles of 64 um (on the slide's 64-um grid) well inside ``blob``, rendered tile by tile."""
    mpp, step = renderer.mpp, int(TILE_UM / renderer.mpp)
    x0, y0 = (int(v / mpp) // TILE * TILE for v in blob.bbox()[:2])
    x1, y1 = (int(v / mpp) // TILE * TILE + TILE for v in blob.bbox()[2:])
    image = np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint8)
    for y in range(y0, y1, TILE):
        for x in range(x0, x1, TILE):
            image[y - y0 : y - y0 + TILE, x - x0 : x - x0 + TILE] = renderer.render(x, y)[0]
    centre = np.array(blob.centre)
    inner = MplPath(centre + (blob.polygon() - centre) * 0.85)  # keep clear of the edge
    tiles = []
    for ty in range(0, y1 - y0, step):
        for tx in range(0, x1 - x0, step):
            corners = (np.array([[0, 0], [step, 0], [0, step], [step, step]]) + (x0 + tx, y0 + ty)) * mpp
            if inner.contains_points(corners).all():
                tiles.append(image[ty : ty + step, tx : tx + step])
    return tiles


@pytest.fixture(scope="module")
def grade_tiles() -> dict:
    """Tiles of 64 um inside the grade-1 and grade-3 regions of three grade-3 slides (two regions of each
    grade per slide, as many tiles of each grade) at 0.5 um/px: at 4, 8 and 16 um/px (area averages of
    level 0) and at level 0 (the middle 32 um). ``cls`` is :data:`TUMOUR` for grade 3 and :data:`MIMIC` for
    grade 1 (the two classes ``leak_accuracy`` tells apart); the group of a tile is ``10 * slide seed +
    region index``."""
    look = Appearance(tone=0.0, mimic_separation=fit_mimic_separation(Appearance(), GRADE_MPP))
    rng = np.random.default_rng(1)
    out: dict = defaultdict(lambda: {"x": [], "cls": [], "group": []})
    step = int(TILE_UM / GRADE_MPP)
    for seed in graded_seeds(GRADE_LAYOUT, [1, 1, 3, 3], 3, GRADE_SIDE):
        scene = make_scene(seed, 3, GRADE_LAYOUT, size=GRADE_SIDE)
        renderer = TileRenderer(scene, GRADE_MPP, look)
        per_class: dict[str, list[tuple[int, np.ndarray]]] = {TUMOUR: [], MIMIC: []}
        for n, region in enumerate(scene.regions):
            cls = TUMOUR if region.grade == 3 else MIMIC
            per_class[cls] += [(seed * 10 + n, tile) for tile in region_tiles(renderer, region.blob)]
        keep = min(len(v) for v in per_class.values())
        for cls, items in per_class.items():
            for i in rng.permutation(len(items))[:keep]:
                group, tile = items[i]
                views = {"full": tile[step // 4 : 3 * step // 4, step // 4 : 3 * step // 4]}
                for r in LOW:
                    f = int(r / GRADE_MPP)
                    views[r] = tile.reshape(step // f, f, step // f, f, 3).mean(axis=(1, 3))
                for key, view in views.items():
                    out[key]["x"].append(view)
                    out[key]["cls"].append(cls)
                    out[key]["group"].append(group)
    return {k: {f: np.array(v) for f, v in d.items()} for k, d in out.items()}


def test_enough_tiles_of_each_grade(grade_tiles: dict) -> None:
    data = grade_tiles[8]
    assert (data["cls"] == TUMOUR).sum() == (data["cls"] == MIMIC).sum() >= 100
    assert len(np.unique(data["group"])) == 12


@pytest.mark.parametrize("um_per_px", LOW)
def test_lowest_and_highest_grade_look_alike_at_low_magnification(grade_tiles: dict, um_per_px: int) -> None:
    assert leak_accuracy(grade_tiles[um_per_px]) <= 0.65


def test_lowest_and_highest_grade_differ_at_full_resolution(grade_tiles: dict) -> None:
    assert leak_accuracy(grade_tiles["full"]) >= 0.95


def test_synthetic_survival_shortens_with_the_class_and_leaves_the_slides_alone(tmp_path: Path) -> None:
    """Hazard ratio 2 per class (the hazard's estimate doubles per class, within 0.3 on log2 over 4000
    patients); censoring at the end of follow-up; the same draws for the same seed; a cohort with survival
    has the same slides as one without, and the times of :func:`synthetic_survival`."""
    labels = np.repeat(np.arange(4), 1000)
    time, event = synthetic_survival(labels, seed=3)
    assert time.min() > 0 and time.max() <= FOLLOW_UP_MONTHS[1] and set(np.unique(event)) == {0, 1}
    hazard = [event[labels == c].sum() / time[labels == c].sum() for c in range(4)]  # exponential MLE
    np.testing.assert_allclose(np.diff(np.log2(hazard)), 1.0, atol=0.3)
    again = synthetic_survival(labels, seed=3)
    assert np.array_equal(time, again[0]) and np.array_equal(event, again[1])
    options = SlideOptions(layout=GRADED, look=LOOK, mpp=0.5)
    for name, survival in (("plain", False), ("survival", True)):
        make_cohort(
            tmp_path / name, 3, 1024, 4, options=options, workers=1, progress=False, survival=survival
        )
    images = sorted((tmp_path / "plain" / "images").iterdir())
    assert [p.read_bytes() for p in images] == [
        (tmp_path / "survival" / "images" / p.name).read_bytes() for p in images
    ]
    entries = json.loads((tmp_path / "survival" / "datalist.json").read_text())
    entries = sorted(
        (e for split in ("training", "validation", "testing") for e in entries[split]),
        key=lambda e: e["image"],
    )
    times, events = synthetic_survival(np.array([e["label"] for e in entries]), seed=4)
    assert [(e["time"], e["event"]) for e in entries] == list(zip(times.tolist(), events.tolist()))
