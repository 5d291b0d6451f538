"""Tumour annotations: QuPath GeoJSON and ASAP XML reading, overlap fractions, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from smt_monai.data.annotations import (
    AnnotationOverlap,
    TumourAnnotation,
    annotation_classes,
    annotation_names,
    polygon_feature,
    unknown_annotation_classes,
    write_geojson,
)

SQUARE = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
HOLE = [[25, 25], [75, 25], [75, 75], [25, 75], [25, 25]]


def feature(coords: list, cls: str | None = None, kind: str = "Polygon") -> dict:
    props: dict = {"objectType": "annotation"}
    if cls is not None:
        props["classification"] = {"name": cls, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords}, "properties": props}


def write(tmp_path: Path, data: object, name: str = "a.geojson") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def shifted(ring: list, dx: float, dy: float = 0.0) -> list:
    return [[x + dx, y + dy] for x, y in ring]


def test_geojson_picks_tumour_class_case_insensitively(tmp_path: Path) -> None:
    data = {
        "type": "FeatureCollection",
        "features": [
            feature([SQUARE], "Tumor"),
            feature([shifted(SQUARE, 200)], "tumour"),
            feature([shifted(SQUARE, 400)], "Stroma"),
            feature([shifted(SQUARE, 600)], "Mimic"),
        ],
    }
    ann = TumourAnnotation.from_file(write(tmp_path, data))
    assert len(ann.polygons) == 2
    assert ann.polygons[0].shape == (4, 2)  # closing vertex dropped
    boxes = np.array([[0, 0, 100], [200, 0, 100], [400, 0, 100], [600, 0, 100]])
    np.testing.assert_allclose(ann.overlap_fraction(boxes), [1, 1, 0, 0])


def test_geojson_without_classes_takes_all_features(tmp_path: Path) -> None:
    ann = TumourAnnotation.from_file(write(tmp_path, [feature([SQUARE]), feature([shifted(SQUARE, 200)])]))
    assert len(ann.polygons) == 2


def test_geojson_only_other_classes_means_no_tumour(tmp_path: Path) -> None:
    ann = TumourAnnotation.from_file(write(tmp_path, [feature([SQUARE], "Mimic")]))
    assert ann.empty
    assert ann.overlap_fraction(np.array([[0, 0, 100]])).tolist() == [0.0]
    assert ann.intersects(np.array([[0, 0, 100]])).tolist() == [False]


def test_overlap_fraction_matches_hand_computed_values(tmp_path: Path) -> None:
    ann = TumourAnnotation.from_file(write(tmp_path, feature([SQUARE], "Tumor")))
    boxes = np.array(
        [
            [0, 0, 100],  # exactly the square
            [50, 0, 100],  # right half outside
            [50, 50, 100],  # one quarter inside
            [-100, 0, 100],  # touching on an edge: no area
            [10, 10, 20],  # small box inside
            [90, 90, 20],  # a quarter of it inside
            [200, 200, 50],  # far away
        ],
        dtype=float,
    )
    expected = [1.0, 0.5, 0.25, 0.0, 1.0, 0.25, 0.0]
    np.testing.assert_allclose(ann.overlap_fraction(boxes), expected, atol=1e-9)
    assert ann.intersects(boxes).tolist() == [True, True, True, False, True, True, False]


def test_overlap_fraction_is_accurate_for_small_boxes_on_a_slanted_edge(tmp_path: Path) -> None:
    """Triangle below the line x + y = 1000: the covered fraction of a box is known in closed form."""
    ann = TumourAnnotation(polygons=[np.array([[0.0, 0.0], [1000.0, 0.0], [0.0, 1000.0]])])
    rng = np.random.default_rng(0)
    size = rng.uniform(16, 256, 200)
    centre = rng.uniform(200, 800, 200)
    x = centre - size / 2 + rng.uniform(-0.5, 0.5, 200) * size
    y = 1000 - centre - size / 2
    boxes = np.stack([x, y, size], axis=1)
    # covered part: x' + y' < 1000 inside the box; with t = (1000 - x - y) / size that is the area under
    # the line u + v < t in the unit square
    t = (1000 - x - y) / size
    exact = np.where(t <= 1, t**2 / 2, 1 - (2 - t) ** 2 / 2)
    exact = np.clip(exact, 0, 1)
    np.testing.assert_allclose(ann.overlap_fraction(boxes), exact, atol=0.03)


def test_holes_and_multipolygons(tmp_path: Path) -> None:
    data = [feature([[SQUARE, HOLE], [shifted(SQUARE, 200)]], "Tumor", kind="MultiPolygon")]
    ann = TumourAnnotation.from_file(write(tmp_path, data))
    assert len(ann.polygons) == 2 and len(ann.holes[0]) == 1
    boxes = np.array([[0, 0, 100], [30, 30, 40], [200, 0, 100], [0, 0, 50]], dtype=float)
    np.testing.assert_allclose(ann.overlap_fraction(boxes), [0.75, 0.0, 1.0, 1 - 625 / 2500], atol=1e-9)
    assert ann.intersects(boxes).tolist() == [True, False, True, True]


def asap_xml(annotations: list[tuple[str, str, list]]) -> str:
    body = []
    for name, group, coords in annotations:
        points = "".join(
            f'<Coordinate Order="{i}" X="{x}" Y="{y}" />' for i, (x, y) in reversed(list(enumerate(coords)))
        )
        body.append(
            f'<Annotation Name="{name}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">'
            f"<Coordinates>{points}</Coordinates></Annotation>"
        )
    groups = '<AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#ff0000" /></AnnotationGroups>'
    annotations_xml = f"<Annotations>{''.join(body)}</Annotations>"
    return f'<?xml version="1.0"?><ASAP_Annotations>{annotations_xml}{groups}</ASAP_Annotations>'


def test_asap_xml_tumour_groups_and_exclusions(tmp_path: Path) -> None:
    text = asap_xml(
        [
            ("Annotation 0", "_0", SQUARE[:-1]),
            ("Annotation 1", "Tumor", shifted(SQUARE[:-1], 200)),
            ("Annotation 2", "_2", HOLE[:-1]),
        ]
    )
    ann = TumourAnnotation.from_file(write(tmp_path, text, "a.xml"))
    assert len(ann.polygons) == 2 and len(ann.exclusions) == 1
    np.testing.assert_allclose(ann.polygons[0], np.array(SQUARE[:-1], dtype=float))  # sorted by Order
    boxes = np.array([[0, 0, 100], [30, 30, 40], [200, 0, 100]], dtype=float)
    np.testing.assert_allclose(ann.overlap_fraction(boxes), [0.75, 0.0, 1.0], atol=1e-9)
    assert ann.intersects(boxes).tolist() == [True, False, True]


def test_round_trip_of_written_geojson(tmp_path: Path) -> None:
    ring = np.array([[10.0, 10.0], [90.5, 12.25], [50.0, 80.0]])
    path = write_geojson(tmp_path / "w.geojson", [polygon_feature(ring, "Tumor", (200, 0, 0))])
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    props = data["features"][0]["properties"]
    assert props == {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}
    np.testing.assert_allclose(TumourAnnotation.from_file(path).polygons[0], ring)


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("bad.geojson", "{not json", "not valid JSON"),
        ("bad.geojson", json.dumps({"type": "FeatureCollection", "features": 3}), "expected a GeoJSON"),
        ("bad.geojson", json.dumps([{"type": "Feature", "properties": {}}]), "no geometry"),
        ("bad.geojson", json.dumps([feature([[[0, 0], [1, 1]]])]), "fewer than 3 vertices"),
        ("bad.geojson", json.dumps([feature([[[0, 0], ["a", 1], [2, 2]]])]), "non-numeric"),
        ("bad.xml", "<ASAP_Annotations><Annotations>", "not valid XML"),
        ("bad.xml", "<Other><Thing/></Other>", "not an ASAP annotation"),
        (
            "bad.xml",
            '<ASAP_Annotations><Annotations><Annotation Name="A" Type="Polygon"><Coordinates>'
            '<Coordinate Order="0" X="1" /></Coordinates></Annotation></Annotations></ASAP_Annotations>',
            "numeric X and Y",
        ),
    ],
)
def test_malformed_files_raise_value_error_naming_file(
    tmp_path: Path, name: str, content: str, problem: str
) -> None:
    path = write(tmp_path, content, name)
    with pytest.raises(ValueError, match=problem) as err:
        TumourAnnotation.from_file(path)
    assert str(path) in str(err.value)


def test_missing_file_raises_value_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.geojson"
    with pytest.raises(ValueError, match="not found") as err:
        TumourAnnotation.from_file(path)
    assert str(path) in str(err.value)


def test_boxes_must_be_n_by_3() -> None:
    ann = TumourAnnotation(polygons=[np.array(SQUARE[:-1], dtype=float)])
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        ann.overlap_fraction(np.zeros((2, 4)))


GRADES = ["benign", "grade 1", "grade 2", "grade 3"]


def test_graded_polygons_give_each_box_its_class_fractions_highest_class_first(tmp_path: Path) -> None:
    """Grading: polygons carry their grade by class name; a point under two polygons counts for the higher
    grade, so the fractions of a box are disjoint and sum to its tumour fraction."""
    path = write(
        tmp_path,
        {
            "type": "FeatureCollection",
            "features": [
                feature([SQUARE], "Grade 1"),
                feature([shifted(SQUARE, 50)], "grade 3"),  # overlaps the right half of the first
                feature([shifted(SQUARE, 300)], "Mimic"),
            ],
        },
    )
    classes = annotation_classes(GRADES)
    assert classes == {"grade 1": 1, "grade 2": 2, "grade 3": 3}
    ann = TumourAnnotation.from_file(path, classes)
    assert sorted(ann.classes) == [1, 3] and ann.num_classes == 3
    boxes = np.array([[0, 0, 100], [100, 0, 50], [300, 0, 100]], dtype=float)
    np.testing.assert_allclose(ann.class_overlap(boxes, 3), [[0.5, 0, 0.5], [0, 0, 1], [0, 0, 0]], atol=1e-9)
    np.testing.assert_allclose(ann.overlap_fraction(boxes), [1.0, 1.0, 0.0], atol=1e-9)
    overlap = AnnotationOverlap(classes)(
        [str(path), ""], np.array([0, 0, 1]), np.array([[0, 0, 100], [100, 0, 50], [0, 0, 100]])
    )
    assert overlap.shape == (3, 3) and np.isnan(overlap[2]).all()
    np.testing.assert_allclose(overlap[:2], [[0.5, 0, 0.5], [0, 0, 1]], atol=1e-9)
    # diagnosis reads the same file as "no tumour" (no polygon is called Tumor) and checks nothing
    assert TumourAnnotation.from_file(path, annotation_classes(["negative", "tumour"])).empty
    assert unknown_annotation_classes(path, ["negative", "tumour"]) is None


def test_asap_groups_name_grades(tmp_path: Path) -> None:
    text = asap_xml(
        [("a", "grade 2", SQUARE[:-1]), ("b", "_0", shifted(SQUARE[:-1], 200)), ("c", "_2", HOLE[:-1])]
    )
    path = write(tmp_path, text, "a.xml")
    ann = TumourAnnotation.from_file(path, annotation_classes(GRADES))
    assert ann.classes == [2] and len(ann.exclusions) == 1
    np.testing.assert_allclose(ann.class_overlap(np.array([[0.0, 0.0, 100.0]]), 3), [[0, 0.75, 0]], atol=1e-9)
    assert annotation_names(path) == {"grade 2", "_0"}
    assert "'_0'" in unknown_annotation_classes(path, GRADES)
    # for diagnosis every group but the exclusions is tumour, as CAMELYON16 writes them
    assert len(TumourAnnotation.from_file(path).polygons) == 2


def test_a_grading_model_names_the_annotation_classes_it_does_not_know(tmp_path: Path) -> None:
    known = write(
        tmp_path, [feature([SQUARE], "Grade 2"), feature([SQUARE], "benign"), feature([SQUARE], "mimic")]
    )
    assert unknown_annotation_classes(known, GRADES) is None
    odd = write(
        tmp_path, [feature([SQUARE], "Grade 5"), feature([SQUARE], "Tumor"), feature([SQUARE])], "b.json"
    )
    message = unknown_annotation_classes(odd, GRADES)
    assert "'grade 5'" in message and "'tumor'" in message and "polygons without a class" in message
    assert "benign, grade 1, grade 2, grade 3" in message


def test_largest_diameter_is_the_greatest_dimension_of_the_largest_lesion(tmp_path: Path) -> None:
    """The maximum Feret diameter over the polygons: an ellipse's major axis, a square's diagonal, holes
    ignored; no polygon gives 0, a degenerate (collinear) ring its end-to-end length."""
    angle = np.linspace(0, 2 * np.pi, 400, endpoint=False)
    ellipse = np.c_[500 + 120 * np.cos(angle), 500 + 40 * np.sin(angle)]
    data = [
        feature([SQUARE, HOLE], "Tumor"),  # diagonal 141.4
        feature([ellipse.tolist() + [ellipse[0].tolist()]], "Tumor"),  # major axis 240
        feature([shifted(SQUARE, 2000)], "Stroma"),  # not tumour: not a lesion
    ]
    ann = TumourAnnotation.from_file(write(tmp_path, data))
    assert ann.largest_diameter() == pytest.approx(240.0, rel=1e-4)
    square = TumourAnnotation.from_file(write(tmp_path, [feature([SQUARE, HOLE], "Tumor")], "b.geojson"))
    assert square.largest_diameter() == pytest.approx(100 * np.sqrt(2))
    assert TumourAnnotation([]).largest_diameter() == 0.0
    assert TumourAnnotation([[[0, 0], [30, 40], [60, 80]]]).largest_diameter() == pytest.approx(100.0)
