"""Datalists and slide lists: relative paths, every problem listed at once, CSV / folder / text lists."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from smt_monai.data.datalist import DatalistError, class_names, load_datalist, load_slide_list


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_relative_paths_resolve_against_dataset_dir(tmp_path: Path) -> None:
    _touch(tmp_path / "data" / "a.tif")
    listing = tmp_path / "lists" / "datalist.json"
    listing.parent.mkdir()
    listing.write_text(json.dumps({"training": [{"image": "a.tif", "label": 1}]}))
    entries = load_datalist(listing, "training", dataset_dir=tmp_path / "data")
    assert entries == [{"image": str(tmp_path / "data" / "a.tif"), "label": 1}]


def test_every_problem_is_listed(tmp_path: Path) -> None:
    _touch(tmp_path / "ok.tif")
    listing = tmp_path / "datalist.json"
    listing.write_text(
        json.dumps(
            {
                "training": [
                    {"image": "ok.tif", "label": 0},
                    {"label": 1},
                    {"image": "gone.tif", "label": 1},
                    {"image": "ok.tif"},
                    {"image": "ok.tif", "label": 1, "annotation": "nope.geojson"},
                ]
            }
        )
    )
    with pytest.raises(DatalistError) as info:
        load_datalist(listing, "training")
    message = str(info.value)
    assert "4 problem(s)" in message
    for part in ("entry 1: missing key 'image'", "gone.tif", "entry 3", "nope.geojson"):
        assert part in message


def test_labels_outside_the_models_classes_are_listed(tmp_path: Path) -> None:
    _touch(tmp_path / "a.tif")
    listing = tmp_path / "datalist.json"
    entries = [{"image": "a.tif", "label": label} for label in (0, 3, 5, -1, 1)]
    listing.write_text(json.dumps({"testing": entries}))
    assert len(load_datalist(listing, "testing")) == 5  # without a model, any integer label is kept
    with pytest.raises(DatalistError) as info:
        load_datalist(listing, "testing", num_classes=4)
    message = str(info.value)
    assert "2 problem(s)" in message
    assert "entry 2" in message and "label 5 is not one of the model's 4 classes (0 to 3)" in message
    assert "entry 3" in message and "label -1" in message and "entry 1" not in message


def test_survival_and_annotation_classes_are_checked_at_start(tmp_path: Path) -> None:
    """Survival keys parse to numbers (both or neither); a grading model's datalist whose annotation holds a
    class it does not know is refused at start, naming the slide."""
    _touch(tmp_path / "a.tif")
    grades = ["benign", "grade 1", "grade 2"]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9]]]}}
    for name, cls in (("good.geojson", "grade 2"), ("bad.geojson", "grade 7")):
        labelled = {**feature, "properties": {"classification": {"name": cls}}}
        (tmp_path / name).write_text(json.dumps([labelled]))
    entries = [
        {"image": "a.tif", "label": 2, "annotation": "good.geojson", "time": "12.5", "event": 1},
        {"image": "a.tif", "label": 1, "time": 3},
        {"image": "a.tif", "label": 1, "time": -1, "event": 2},
        {"image": "a.tif", "label": 1, "annotation": "bad.geojson"},
    ]
    listing = tmp_path / "datalist.json"
    listing.write_text(json.dumps({"testing": entries[:1], "validation": entries}))
    good = load_datalist(listing, "testing", class_names=grades)
    assert (good[0]["time"], good[0]["event"]) == (12.5, 1)
    with pytest.raises(DatalistError) as info:
        load_datalist(listing, "validation", class_names=grades)
    message = str(info.value)
    assert "3 problem(s)" in message and "entry 0" not in message
    assert "entry 1" in message and "both 'time' and 'event'" in message
    assert "entry 2" in message and "event 0 (censored) or 1" in message
    assert "entry 3 (" in message and "a.tif" in message and "'grade 7'" in message
    with pytest.raises(DatalistError, match="label 2 is not one of the model's 2 classes"):
        load_datalist(listing, "testing", class_names=["negative", "tumour"])


def test_missing_split_and_bad_json(tmp_path: Path) -> None:
    listing = tmp_path / "datalist.json"
    listing.write_text(json.dumps({"training": []}))
    with pytest.raises(DatalistError, match="no split 'testing'"):
        load_datalist(listing, "testing")
    listing.write_text(json.dumps([{"image": "a.tif"}]))
    with pytest.raises(DatalistError) as error:
        load_datalist(listing, "testing")
    assert str(error.value) == (
        f'{listing}: a JSON list, not a datalist of splits: give {{"testing": [{{"image": ...}}, ...]}} '
        "(MONAI's decathlon form)"
    )
    listing.write_text("{not json")
    with pytest.raises(DatalistError, match="not valid JSON"):
        load_datalist(listing)
    with pytest.raises(DatalistError, match="does not exist"):
        load_datalist(tmp_path / "none.json")


def test_a_folder_is_searched_with_its_subfolders_skipping_hidden_names(tmp_path: Path) -> None:
    """An archive by year and case: every slide below the folder, in path order; macOS's ``._`` resource
    forks, hidden folders (an OUT's ``.locks``) and non-slides are left out; a link back up does not loop."""
    archive = tmp_path / "archive"
    for name in ("2024/case_2/b.SVS", "2024/case_1/a.tif", "2024/case_1/._a.tif", "2023/c.ndpi",
                 "2023/c/Index.dat", ".trash/d.svs", "z.mrxs", "z/Slidedat.ini", "notes.txt"):  # fmt: skip
        _touch(archive / name)
    (archive / "2024" / "up").symlink_to(archive, target_is_directory=True)
    found = [Path(e["image"]).relative_to(archive).as_posix() for e in load_slide_list(archive)]
    assert found == ["2023/c.ndpi", "2024/case_1/a.tif", "2024/case_2/b.SVS", "z.mrxs"]
    with pytest.raises(DatalistError, match="neither the folder nor its subfolders hold slide files"):
        load_slide_list(archive / "2023" / "c")


def test_slide_lists_of_every_kind(tmp_path: Path) -> None:
    for name in ("b.svs", "a.tif", "notes.txt"):
        _touch(tmp_path / "slides" / name)
    folder = load_slide_list(tmp_path / "slides")
    assert [Path(e["image"]).name for e in folder] == ["a.tif", "b.svs"]

    csv_file = tmp_path / "list.csv"
    csv_file.write_text("image,label\nslides/a.tif,1\nslides/missing.svs,\n")
    rows = load_slide_list(csv_file)
    assert rows == [
        {"image": str(tmp_path / "slides/a.tif"), "label": 1},
        {"image": str(tmp_path / "slides/missing.svs")},
    ]

    text = tmp_path / "list.txt"
    text.write_text("# slides\nslides/b.svs\n\n/abs/x.svs\n")
    assert [e["image"] for e in load_slide_list(text)] == [str(tmp_path / "slides/b.svs"), "/abs/x.svs"]

    listing = tmp_path / "d.json"
    listing.write_text(
        json.dumps({"testing": [{"image": "slides/a.tif", "label": 0}], "external": ["slides/b.svs"]})
    )
    assert load_slide_list(listing)[0]["label"] == 0
    assert load_slide_list(listing, datalist_key="external")[0]["image"].endswith("b.svs")

    annotation = tmp_path / "slide.geojson"  # neither slide nor list: one clear error, not a list of lines
    annotation.write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(DatalistError, match="slide.geojson: neither a slide"):
        load_slide_list(annotation)
    binary = tmp_path / "slides.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatalistError, match="must be text"):
        load_slide_list(binary)

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("path\nx.svs\n")
    with pytest.raises(DatalistError, match="'image' column"):
        load_slide_list(bad_csv)


def test_a_batch_mixing_slides_with_and_without_survival_collates_with_nan() -> None:
    """collate_views: slides that give no survival get NaN time and event beside those that do."""
    from smt_monai.data import collate_views

    view = {"image": torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "box": torch.zeros(1, 3), "label": 1}
    batch = collate_views([{**view, "time": 3.0, "event": 1}, view])
    assert batch["time"][0] == 3.0 and math.isnan(batch["time"][1]) and math.isnan(batch["event"][1])
    assert "time" not in collate_views([view, view])


def test_labels_may_be_class_names_in_any_case(tmp_path: Path) -> None:
    """A reference table's ``Tumor`` / ``Normal`` where the datalist's ``labels`` name the classes; anything
    else that is not a whole class number is listed with the classes."""
    for name in ("a.tif", "b.tif", "c.tif", "d.tif"):
        _touch(tmp_path / name)
    entries = [{"image": "a.tif", "label": "Tumor"}, {"image": "b.tif", "label": " normal "},
               {"image": "c.tif", "label": "1"}, {"image": "d.tif", "label": 0}]  # fmt: skip
    listing = tmp_path / "datalist.json"
    listing.write_text(json.dumps({"labels": {"0": "normal", "1": "tumor"}, "training": entries}))
    names = class_names(listing, 2)
    assert [e["label"] for e in load_datalist(listing, class_names=names)] == [1, 0, 1, 0]
    entries += [{"image": "a.tif", "label": "benign"}, {"image": "b.tif", "label": 0.5}]
    listing.write_text(json.dumps({"labels": {"0": "normal", "1": "tumor"}, "training": entries}))
    with pytest.raises(DatalistError) as error:
        load_datalist(listing, class_names=names)
    assert "label 'benign' is not a class number nor one of the classes ['normal', 'tumor']" in str(
        error.value
    )
    assert "label 0.5 is not a class number" in str(error.value)
