"""Tumour annotations: reading QuPath GeoJSON and CAMELYON16 ASAP XML, and tumour overlap of boxes.

SMT uses an annotation to label next-layer regions (method-notes, "Selection": a region is positive when
its tumour-overlap fraction reaches ``label_overlap``; for grading, a region takes the highest class it
overlaps by that much) and to measure where it focused (focus hit rate and precision). Both need, for
level-0 boxes ``(x, y, size)``, the fraction of each box covered by tumour (or by each class), also for
boxes far smaller than the tumour (a layer-3 region may be a few hundred pixels on a 100000-px slide). So
coverage is not read off one global mask: each box is sampled on its own ``samples`` x ``samples`` grid
of points, tested against the polygons with :meth:`matplotlib.path.Path.contains_points` (error under
about ``1 / samples`` of the box side along each crossing edge, i.e. a few percent at 32).

Formats:

- QuPath GeoJSON: a ``FeatureCollection``, a list of features or one feature, with ``Polygon`` and
  ``MultiPolygon`` geometries in level-0 px (holes are subtracted). A feature's class is
  ``properties.classification.name`` (or a string ``classification``), matched in any case. For diagnosis,
  "Tumor"/"Tumour" features are tumour, and if no feature has a class, all are. For grading, each polygon
  takes the class whose name it carries (e.g. "grade 2" is class 2), and where polygons of several classes
  overlap, the highest wins.
- ASAP XML (CAMELYON16): ``Annotations/Annotation/Coordinates/Coordinate`` with ``X`` and ``Y``. Polygons of
  group ``_2`` are exclusions (normal tissue cut out of tumour). For diagnosis all others (``_0``, ``_1``,
  ``Tumor``, ...) are tumour; for grading the group (``PartOfGroup``) names the class. Point annotations
  (``Dot``, ``PointSet``) have no area and are skipped.

Which names make which class is a mapping, lower-case name to class index (:func:`annotation_classes` builds
it from a model's class names); a set of names is class 1.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.path import Path as MplPath
from matplotlib.transforms import Bbox
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

TUMOUR_NAMES = frozenset({"tumor", "tumour"})
EXCLUSION_GROUPS = frozenset({"_2"})
POINT_TYPES = frozenset({"dot", "pointset"})
UNCLASSIFIED = ""  # the class name of a feature without one, in annotation_names

ClassNames = Collection[str] | Mapping[str, int]
"""Annotation classes to read: lower-case names mapped to class indices (>= 1), or a set of names
(class 1)."""


def class_map(names: ClassNames) -> dict[str, int]:
    """``names`` as a mapping lower-case name -> class index (a set of names is class 1)."""
    if isinstance(names, Mapping):
        return {str(k).lower(): int(v) for k, v in names.items()}
    return {str(n).lower(): 1 for n in names}


def annotation_classes(class_names: Sequence[str]) -> dict[str, int]:
    """Which annotation classes label a model's classes: for two classes, tumour ("Tumor"/"Tumour", or the
    name of class 1) is class 1; for more (grading), class ``c``'s name is class ``c`` for ``c >= 1``."""
    names = [str(n).lower() for n in class_names]
    if len(names) <= 2:
        return class_map(TUMOUR_NAMES | set(names[1:]))
    return {name: c for c, name in enumerate(names) if c > 0}


def _reads_all_tumour(classes: Mapping[str, int]) -> bool:
    """Whether unclassified GeoJSON features and every ASAP group count as class 1: diagnosis, where the
    classes are tumour names only."""
    return set(classes.values()) == {1} and bool(TUMOUR_NAMES & classes.keys())


def _closed_path(ring: np.ndarray) -> MplPath:
    """A closed matplotlib path through the vertices of ``ring`` (N, 2)."""
    vertices = np.concatenate([ring, ring[:1]])
    return MplPath(vertices, closed=True)


@dataclass
class TumourAnnotation:
    """Tumour polygons of one slide in level-0 px, each with its class (1 for diagnosis; the grade for
    grading).

    Attributes:
        polygons: outer rings, each an ``(N, 2)`` float array of ``(x, y)`` vertices.
        holes: for each polygon, its inner rings (not tumour).
        exclusions: rings cut out of every polygon (ASAP group ``_2``).
        source: the file it was read from, if any.
        classes: the class (>= 1) of each polygon; all 1 by default.
    """

    polygons: list[np.ndarray]
    holes: list[list[np.ndarray]] = field(default_factory=list)
    exclusions: list[np.ndarray] = field(default_factory=list)
    source: str | None = None
    classes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.polygons = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in self.polygons]
        self.holes = self.holes or [[] for _ in self.polygons]
        self.classes = [int(c) for c in self.classes] or [1] * len(self.polygons)
        if len(self.holes) != len(self.polygons) or len(self.classes) != len(self.polygons):
            raise ValueError("holes and classes must hold one entry per polygon")
        if min(self.classes, default=1) < 1:
            raise ValueError(f"polygon classes must be >= 1, got {sorted(set(self.classes))}")
        # highest class first, so that a point takes the highest class of the polygons covering it
        order = np.argsort(-np.asarray(self.classes, dtype=np.int64), kind="stable")
        self._paths = [
            (
                self.classes[i],
                _closed_path(self.polygons[i]),
                [_closed_path(h) for h in self.holes[i]],
                self.polygons[i].min(axis=0),
                self.polygons[i].max(axis=0),
            )
            for i in order
        ]
        self._exclusions = [_closed_path(e) for e in self.exclusions]

    @classmethod
    def from_file(cls, path: str | os.PathLike, names: ClassNames = TUMOUR_NAMES) -> TumourAnnotation:
        """Read a QuPath GeoJSON (``.geojson``/``.json``) or ASAP XML (``.xml``) annotation.

        Args:
            path: the file.
            names: the classes to read (see :data:`ClassNames`): tumour by default, where a file without any
                class is all tumour; e.g. ``{"mimic"}`` for the benign mimics ``smt-monai synth`` annotates,
                or :func:`annotation_classes` of a grading model's class names.

        Raises:
            ValueError: if the file is missing, unreadable or not such an annotation; the message names the
                file and the problem.
        """
        shapes = _read(path)
        classes = class_map(names)
        if _reads_all_tumour(classes) and (shapes.xml or set(shapes.names) == {UNCLASSIFIED}):
            kinds = [1] * len(shapes.names)
        else:
            kinds = [classes.get(name, 0) for name in shapes.names]
        keep = [i for i, kind in enumerate(kinds) if kind > 0]
        return cls(
            [shapes.polygons[i] for i in keep],
            [shapes.holes[i] for i in keep],
            shapes.exclusions,
            source=str(path),
            classes=[kinds[i] for i in keep],
        )

    @property
    def num_classes(self) -> int:
        """The highest polygon class (0 without polygons)."""
        return max(self.classes, default=0)

    @property
    def empty(self) -> bool:
        """Whether there is no tumour."""
        return not self.polygons

    def largest_diameter(self) -> float:
        """The greatest dimension of the largest lesion, in level-0 px (0 without polygons): the largest
        distance between two points of one polygon (its maximum Feret diameter, taken over its convex hull).

        Pathology sizes a metastasis by its greatest dimension, and the pN categories of CAMELYON17 (AJCC)
        are cut on it: isolated tumour cells up to 0.2 mm, micrometastases to 2 mm, macrometastases beyond
        (``smt_monai.handlers.LesionRecall``). Each polygon is one lesion; holes do not change its extent.
        """
        largest = 0.0
        for polygon in self.polygons:
            points = np.unique(polygon, axis=0)
            if len(points) > 3:
                try:
                    points = points[ConvexHull(points).vertices]
                except QhullError:  # collinear vertices: a degenerate polygon, all of them count
                    pass
            if len(points) > 1:
                largest = max(largest, float(pdist(points).max()))
        return largest

    def _boxes(self, boxes: np.ndarray) -> np.ndarray:
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 3:
            raise ValueError(f"boxes must have shape (N, 3) as (x, y, size), got {boxes.shape}")
        return boxes

    def overlap_fraction(self, boxes: np.ndarray, samples: int = 32) -> np.ndarray:
        """Fraction of each box ``(x, y, size)`` covered by tumour (any class), from a ``samples`` x
        ``samples`` grid of points at the centres of equal sub-squares of the box.

        Returns:
            ``(N,)`` float array in [0, 1].
        """
        return self.class_overlap(boxes, max(self.num_classes, 1), samples).sum(axis=1)

    def class_overlap(self, boxes: np.ndarray, positive_classes: int, samples: int = 32) -> np.ndarray:
        """Fraction of each box covered by each class ``1 .. positive_classes``, a point counting for the
        highest class covering it (so the fractions of a box sum to its tumour fraction); polygons of a
        higher class count for the highest.

        Returns:
            ``(N, positive_classes)`` float array in [0, 1].
        """
        boxes = self._boxes(boxes)
        out = np.zeros((len(boxes), positive_classes))
        if self.empty or not len(boxes) or positive_classes < 1:
            return out
        offsets = (np.arange(samples) + 0.5) / samples
        gx, gy = np.meshgrid(offsets, offsets)
        unit = np.stack([gx.ravel(), gy.ravel()], axis=1)
        x0, y0, size = boxes[:, 0:1], boxes[:, 1:2], boxes[:, 2:3]
        for i in np.flatnonzero(self.intersects(boxes)):
            points = np.stack([x0[i] + unit[:, 0] * size[i], y0[i] + unit[:, 1] * size[i]], axis=1)
            covered = np.minimum(self._covered(points), positive_classes)
            out[i] = np.bincount(covered, minlength=positive_classes + 1)[1:] / len(points)
        return out

    def _covered(self, points: np.ndarray) -> np.ndarray:
        """The class of each point: the highest class of the polygons covering it, 0 outside them."""
        inside = np.zeros(len(points), dtype=np.int64)
        for kind, outer, holes, lo, hi in self._paths:
            near = (inside == 0) & np.all((points >= lo) & (points <= hi), axis=1)
            if not near.any():
                continue
            hit = outer.contains_points(points[near])
            for hole in holes:
                hit &= ~hole.contains_points(points[near])
            inside[np.flatnonzero(near)[hit]] = kind
        for exclusion in self._exclusions:
            covered = inside > 0
            inside[covered] = np.where(exclusion.contains_points(points[covered]), 0, inside[covered])
        return inside

    def intersects(self, boxes: np.ndarray) -> np.ndarray:
        """Whether each box ``(x, y, size)`` overlaps tumour with positive area (exact geometry: a box
        inside a hole or an exclusion does not).

        Returns:
            ``(N,)`` bool array.
        """
        boxes = self._boxes(boxes)
        out = np.zeros(len(boxes), dtype=bool)
        for i, (x, y, s) in enumerate(boxes):
            bbox = Bbox([[x, y], [x + s, y + s]])
            corners = np.array([[x, y], [x + s, y], [x, y + s], [x + s, y + s]])

            def within(path: MplPath, corners: np.ndarray = corners, bbox: Bbox = bbox) -> bool:
                return bool(
                    path.contains_points(corners).all() and not path.intersects_bbox(bbox, filled=False)
                )

            if any(within(e) for e in self._exclusions):
                continue
            out[i] = any(
                lo[0] < x + s
                and x < hi[0]
                and lo[1] < y + s
                and y < hi[1]
                and outer.intersects_bbox(bbox, filled=True)
                and not any(within(h) for h in holes)
                for _, outer, holes, lo, hi in self._paths
            )
        return out


# ---------------------------------------------------------------------------------------------------------
# Parsers: return (polygons, holes, exclusions); raise ValueError with the problem (no file name).


class AnnotationOverlap:
    """Class-overlap fractions of regions of several slides, from each slide's annotation file.

    Each annotation file is parsed once and kept. A slide without annotation (an empty path) gives NaN, the
    "unknown" that ``smt_monai.focus.next_labels`` reads as weak supervision.

    Args:
        names: the annotation classes read (:data:`ClassNames`; :func:`annotation_classes` of a model's class
            names): their highest class index is the number of positive classes measured.
    """

    def __init__(self, names: ClassNames = TUMOUR_NAMES) -> None:
        self.names = class_map(names)
        self.positive_classes = max(self.names.values(), default=1)
        self._loaded: dict[str, TumourAnnotation] = {}

    def annotation(self, path: str) -> TumourAnnotation | None:
        """The parsed annotation at ``path``, or ``None`` for an empty path."""
        if not path:
            return None
        if path not in self._loaded:
            self._loaded[path] = TumourAnnotation.from_file(path, self.names)
        return self._loaded[path]

    def __call__(self, paths: Sequence[str], slide_index: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """``(M, P)`` fractions of the boxes ``(M, 3)`` covered by each positive class ``1 .. P``
        (:meth:`TumourAnnotation.class_overlap`); row ``i`` belongs to the slide whose annotation file is
        ``paths[slide_index[i]]``."""
        slide_index = np.asarray(slide_index)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 3)
        out = np.full((len(boxes), self.positive_classes), np.nan)
        for slide in np.unique(slide_index):
            annotation = self.annotation(paths[int(slide)])
            if annotation is not None:
                rows = np.flatnonzero(slide_index == slide)
                out[rows] = annotation.class_overlap(boxes[rows], self.positive_classes)
        return out


def annotation_names(path: str | os.PathLike) -> set[str]:
    """The classes (lower case) of the area annotations in a file: GeoJSON feature classes
    (:data:`UNCLASSIFIED` for a feature without one) or ASAP groups (the exclusion group left out).

    Raises:
        ValueError: as :meth:`TumourAnnotation.from_file`.
    """
    return set(_read(path).names)


MIMIC_NAMES = frozenset({"mimic"})
"""Benign look-alikes of tumour, as ``smt-monai synth`` annotates them: the focus diagnostic measures them,
and a grading model's annotations may hold them besides its own classes."""


def unknown_annotation_classes(path: str | os.PathLike, class_names: Sequence[str]) -> str | None:
    """What a grading model (more than two classes) cannot read in an annotation file, or None.

    Every polygon must carry one of the model's class names (its class 0, e.g. "benign", and
    :data:`MIMIC_NAMES` are read as no tumour): a polygon without a class, or with one the model does not
    know ("Tumor" without a grade, a grade it was not built for), would silently label regions wrong.
    Diagnosis models read tumour and ignore other classes, as QuPath projects hold many.

    Raises:
        ValueError: the file cannot be read (as :meth:`TumourAnnotation.from_file`).
    """
    if len(class_names) <= 2:
        return None
    known = {str(n).lower() for n in class_names} | MIMIC_NAMES
    unknown = sorted(annotation_names(path) - known)
    if not unknown:
        return None
    found = ", ".join(repr(n) if n else "polygons without a class" for n in unknown)
    return f"annotation classes the model does not know: {found} (its classes: {', '.join(class_names)})"


@dataclass
class _Shapes:
    """The area annotations of a file, each polygon with its holes and class name (lower case)."""

    polygons: list[np.ndarray]
    holes: list[list[np.ndarray]]
    names: list[str]
    exclusions: list[np.ndarray]
    xml: bool


def _read(path: str | os.PathLike) -> _Shapes:
    """Parse an annotation file; ValueError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: annotation file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read annotation file ({err})") from err
    xml = path.suffix.lower() == ".xml" or text.lstrip()[:1] == "<"
    try:
        return _parse_asap(text) if xml else _parse_geojson(text)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def _ring(coords: Any, what: str) -> np.ndarray:
    try:
        ring = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} has non-numeric coordinates") from err
    if ring.ndim != 2 or ring.shape[1] < 2 or not np.isfinite(ring).all():
        raise ValueError(f"{what} is not a list of [x, y] positions")
    ring = ring[:, :2]
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    if len(ring) < 3:
        raise ValueError(f"{what} has fewer than 3 vertices")
    return ring


def _class_name(feature: dict) -> str | None:
    props = feature.get("properties") or {}
    if not isinstance(props, dict):
        return None
    cls = props.get("classification")
    if isinstance(cls, dict):
        cls = cls.get("name")
    return cls.strip() if isinstance(cls, str) and cls.strip() else None


def _parse_geojson(text: str) -> _Shapes:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err})") from err
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        features = data
    if not isinstance(features, list) or not all(isinstance(f, dict) for f in features):
        raise ValueError("expected a GeoJSON FeatureCollection, a list of features or a feature")
    polygons: list[np.ndarray] = []
    holes: list[list[np.ndarray]] = []
    names: list[str] = []
    for n, feature in enumerate(features):
        geometry = feature.get("geometry")
        if not isinstance(geometry, dict):
            raise ValueError(f"feature {n} has no geometry")
        kind, coords = geometry.get("type"), geometry.get("coordinates")
        if kind == "Polygon":
            shapes = [coords]
        elif kind == "MultiPolygon":
            shapes = coords
        else:
            continue  # points and lines have no area
        if not isinstance(shapes, list):
            raise ValueError(f"feature {n} has malformed {kind} coordinates")
        name = (_class_name(feature) or UNCLASSIFIED).lower()
        for shape in shapes:
            if not isinstance(shape, list) or not shape:
                raise ValueError(f"feature {n} has an empty or malformed polygon")
            polygons.append(_ring(shape[0], f"feature {n}"))
            holes.append([_ring(r, f"a hole of feature {n}") for r in shape[1:]])
            names.append(name)
    return _Shapes(polygons, holes, names, [], xml=False)


def _parse_asap(text: str) -> _Shapes:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise ValueError(f"not valid XML ({err})") from err
    if root.tag != "ASAP_Annotations" and root.find(".//Annotations") is None:
        raise ValueError(f"not an ASAP annotation (root element <{root.tag}>, no <Annotations>)")
    polygons: list[np.ndarray] = []
    names: list[str] = []
    exclusions: list[np.ndarray] = []
    for n, annotation in enumerate(root.iter("Annotation")):
        if (annotation.get("Type") or "").lower() in POINT_TYPES:
            continue
        name = annotation.get("Name") or f"annotation {n}"
        coords = sorted(annotation.iter("Coordinate"), key=lambda c: float(c.get("Order", 0)))
        try:
            xy = [
                [float(c.get("X", "").replace(",", ".")), float(c.get("Y", "").replace(",", "."))]
                for c in coords
            ]
        except ValueError as err:
            raise ValueError(f"{name!r} has a coordinate without numeric X and Y") from err
        ring = _ring(xy, repr(name))
        group = annotation.get("PartOfGroup") or UNCLASSIFIED
        if group in EXCLUSION_GROUPS:
            exclusions.append(ring)
        else:
            polygons.append(ring)
            names.append(group.lower())
    return _Shapes(polygons, [[] for _ in polygons], names, exclusions, xml=True)


# ---------------------------------------------------------------------------------------------------------
# Writing (QuPath's export format)


def polygon_feature(polygon: np.ndarray, name: str, color: Sequence[int]) -> dict:
    """A QuPath annotation feature: a closed ``Polygon`` (level-0 px, 2 decimals) with class ``name``."""
    ring = np.round(np.asarray(polygon, dtype=np.float64), 2).tolist()
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]},
        "properties": {"objectType": "annotation", "classification": {"name": name, "color": list(color)}},
    }


def write_geojson(path: str | os.PathLike, features: list[dict]) -> Path:
    """Write features as a GeoJSON ``FeatureCollection``, as QuPath exports annotations."""
    path = Path(path)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path
