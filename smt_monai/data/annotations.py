"""Tumour annotations: reading QuPath GeoJSON and CAMELYON16 ASAP XML, and tumour overlap of boxes.

SMT uses an annotation to label next-layer regions (method-notes, "Selection": a region is positive when
its tumour-overlap fraction reaches ``label_overlap``) and to measure where it focused (focus hit rate and
precision). Both need, for level-0 boxes ``(x, y, size)``, the fraction of each box covered by tumour, also
for boxes far smaller than the tumour (a layer-3 region may be a few hundred pixels on a 100000-px slide).
So coverage is not read off one global mask: each box is sampled on its own ``samples`` x ``samples`` grid
of points, tested against the polygons with :meth:`matplotlib.path.Path.contains_points` (error under
about ``1 / samples`` of the box side along each crossing edge, i.e. a few percent at 32).

Formats:

- QuPath GeoJSON: a ``FeatureCollection``, a list of features or one feature, with ``Polygon`` and
  ``MultiPolygon`` geometries in level-0 px (holes are subtracted). Features whose class
  (``properties.classification.name``, or a string ``classification``) is "Tumor"/"Tumour" in any case are
  tumour; if no feature has a class, all are.
- ASAP XML (CAMELYON16): ``Annotations/Annotation/Coordinates/Coordinate`` with ``X`` and ``Y``. Polygons of
  group ``_2`` are exclusions (normal tissue cut out of tumour); all others (``_0``, ``_1``, ``Tumor``, ...)
  are tumour. Point annotations (``Dot``, ``PointSet``) have no area and are skipped.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.path import Path as MplPath
from matplotlib.transforms import Bbox

TUMOUR_NAMES = frozenset({"tumor", "tumour"})
EXCLUSION_GROUPS = frozenset({"_2"})
POINT_TYPES = frozenset({"dot", "pointset"})


def _closed_path(ring: np.ndarray) -> MplPath:
    """A closed matplotlib path through the vertices of ``ring`` (N, 2)."""
    vertices = np.concatenate([ring, ring[:1]])
    return MplPath(vertices, closed=True)


@dataclass
class TumourAnnotation:
    """Tumour polygons of one slide in level-0 px.

    Attributes:
        polygons: outer rings, each an ``(N, 2)`` float array of ``(x, y)`` vertices.
        holes: for each polygon, its inner rings (not tumour).
        exclusions: rings cut out of every polygon (ASAP group ``_2``).
        source: the file it was read from, if any.
    """

    polygons: list[np.ndarray]
    holes: list[list[np.ndarray]] = field(default_factory=list)
    exclusions: list[np.ndarray] = field(default_factory=list)
    source: str | None = None

    def __post_init__(self) -> None:
        self.polygons = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in self.polygons]
        self.holes = self.holes or [[] for _ in self.polygons]
        if len(self.holes) != len(self.polygons):
            raise ValueError("holes must hold one list of rings per polygon")
        self._paths = [
            (_closed_path(p), [_closed_path(h) for h in hs], p.min(axis=0), p.max(axis=0))
            for p, hs in zip(self.polygons, self.holes, strict=True)
        ]
        self._exclusions = [_closed_path(e) for e in self.exclusions]

    @classmethod
    def from_file(cls, path: str | os.PathLike, names: frozenset[str] = TUMOUR_NAMES) -> TumourAnnotation:
        """Read a QuPath GeoJSON (``.geojson``/``.json``) or ASAP XML (``.xml``) annotation.

        Args:
            path: the file.
            names: the classes (lower case) whose GeoJSON polygons are read: tumour by default, where a file
                without any class is all tumour; e.g. ``{"mimic"}`` for the benign mimics ``smt-monai synth``
                annotates. ASAP XML holds tumour only, so other names read nothing from it.

        Raises:
            ValueError: if the file is missing, unreadable or not such an annotation; the message names the
                file and the problem.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: annotation file not found")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: cannot read annotation file ({err})") from err
        start = text.lstrip()[:1]
        is_xml = path.suffix.lower() == ".xml" or start == "<"
        try:
            if is_xml:
                parts = _parse_asap(text) if names == TUMOUR_NAMES else ([], [], [])
            else:
                parts = _parse_geojson(text, names)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
        return cls(*parts, source=str(path))

    @property
    def empty(self) -> bool:
        """Whether there is no tumour."""
        return not self.polygons

    def _boxes(self, boxes: np.ndarray) -> np.ndarray:
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 3:
            raise ValueError(f"boxes must have shape (N, 3) as (x, y, size), got {boxes.shape}")
        return boxes

    def overlap_fraction(self, boxes: np.ndarray, samples: int = 32) -> np.ndarray:
        """Fraction of each box ``(x, y, size)`` covered by tumour, from a ``samples`` x ``samples`` grid of
        points at the centres of equal sub-squares of the box.

        Returns:
            ``(N,)`` float array in [0, 1].
        """
        boxes = self._boxes(boxes)
        out = np.zeros(len(boxes))
        if self.empty or not len(boxes):
            return out
        offsets = (np.arange(samples) + 0.5) / samples
        gx, gy = np.meshgrid(offsets, offsets)
        unit = np.stack([gx.ravel(), gy.ravel()], axis=1)
        x0, y0, size = boxes[:, 0:1], boxes[:, 1:2], boxes[:, 2:3]
        for i in np.flatnonzero(self.intersects(boxes)):
            points = np.stack([x0[i] + unit[:, 0] * size[i], y0[i] + unit[:, 1] * size[i]], axis=1)
            out[i] = self._covered(points).mean()
        return out

    def _covered(self, points: np.ndarray) -> np.ndarray:
        """Which points lie in tumour."""
        inside = np.zeros(len(points), dtype=bool)
        for outer, holes, lo, hi in self._paths:
            near = ~inside & np.all((points >= lo) & (points <= hi), axis=1)
            if not near.any():
                continue
            hit = outer.contains_points(points[near])
            for hole in holes:
                hit &= ~hole.contains_points(points[near])
            inside[np.flatnonzero(near)[hit]] = True
        for exclusion in self._exclusions:
            inside[inside] = ~exclusion.contains_points(points[inside])
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
                for outer, holes, lo, hi in self._paths
            )
        return out


# ---------------------------------------------------------------------------------------------------------
# Parsers: return (polygons, holes, exclusions); raise ValueError with the problem (no file name).


class AnnotationOverlap:
    """Tumour-overlap fractions of regions of several slides, from each slide's annotation file.

    Each annotation file is parsed once and kept. A slide without annotation (an empty path) gives NaN, the
    "unknown" that ``smt_monai.focus.next_labels`` reads as weak supervision.

    Args:
        names: the annotation classes whose overlap is measured (``TumourAnnotation.from_file``).
    """

    def __init__(self, names: frozenset[str] = TUMOUR_NAMES) -> None:
        self.names = names
        self._loaded: dict[str, TumourAnnotation] = {}

    def annotation(self, path: str) -> TumourAnnotation | None:
        """The parsed annotation at ``path``, or ``None`` for an empty path."""
        if not path:
            return None
        if path not in self._loaded:
            self._loaded[path] = TumourAnnotation.from_file(path, self.names)
        return self._loaded[path]

    def __call__(self, paths: Sequence[str], slide_index: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """``(M,)`` fractions of the boxes ``(M, 3)`` covered by tumour; row ``i`` belongs to the slide whose
        annotation file is ``paths[slide_index[i]]``."""
        slide_index = np.asarray(slide_index)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 3)
        out = np.full(len(boxes), np.nan)
        for slide in np.unique(slide_index):
            annotation = self.annotation(paths[int(slide)])
            if annotation is not None:
                rows = np.flatnonzero(slide_index == slide)
                out[rows] = annotation.overlap_fraction(boxes[rows])
        return out


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


def _parse_geojson(
    text: str, names: frozenset[str] = TUMOUR_NAMES
) -> tuple[list[np.ndarray], list[list[np.ndarray]], list[np.ndarray]]:
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
    if any(_class_name(f) for f in features):
        features = [f for f in features if (_class_name(f) or "").lower() in names]
    elif names != TUMOUR_NAMES:
        features = []
    polygons: list[np.ndarray] = []
    holes: list[list[np.ndarray]] = []
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
        for shape in shapes:
            if not isinstance(shape, list) or not shape:
                raise ValueError(f"feature {n} has an empty or malformed polygon")
            polygons.append(_ring(shape[0], f"feature {n}"))
            holes.append([_ring(r, f"a hole of feature {n}") for r in shape[1:]])
    return polygons, holes, []


def _parse_asap(text: str) -> tuple[list[np.ndarray], list[list[np.ndarray]], list[np.ndarray]]:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise ValueError(f"not valid XML ({err})") from err
    if root.tag != "ASAP_Annotations" and root.find(".//Annotations") is None:
        raise ValueError(f"not an ASAP annotation (root element <{root.tag}>, no <Annotations>)")
    polygons: list[np.ndarray] = []
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
        (exclusions if annotation.get("PartOfGroup") in EXCLUSION_GROUPS else polygons).append(ring)
    return polygons, [[] for _ in polygons], exclusions


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
