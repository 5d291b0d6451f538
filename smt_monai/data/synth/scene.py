"""Layout of one synthetic slide: tissue sections, suspicious regions, pen marks and debris on the glass,
and the low-resolution fields the tile renderer interpolates.

Everything here is in micrometres from the slide's top-left corner and is decided before any pixel is
drawn, from one seed, so that a slide rendered at any mpp shows the same specimen. A slide is laid out in
one of two ways: physically (its tissue spans an extent drawn from ``LayoutOptions.tissue_extent``, and
the slide is that tissue plus a glass margin), or into a given slide size (the tissue then covers a
fraction of it). Suspicious regions have physical radii either way, like micro- to macro-metastases.

The draws that depend on the slide label come last, so that the number, size and place of the suspicious
regions follow the same distribution whatever the label: a positive slide only turns some of its
suspicious regions into tumour, a negative one keeps them all as benign mimics. Pen marks and debris come
from a random stream of their own, so that asking for them changes nothing else.

A slide is labelled in one of ``LayoutOptions.num_classes`` classes C. With C = 2 (diagnosis) the label
says whether the slide holds tumour. With C >= 3 (grading) it is the slide's grade g: 0 is benign (only
mimics); for g > 0 the tumour regions are chosen as in a positive slide, one of them gets grade g and each
other one a grade drawn uniformly from 1 to g, so that the slide's grade is that of its worst region, as a
pathologist grades a specimen. The grades come from a random stream of their own, so that the layout and
which regions are tumour do not depend on C. How a grade shows is the renderer's matter (:mod:`.render`):
only at high magnification.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

TUMOUR = "Tumor"
MIMIC = "Mimic"

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Blob:
    """A smooth star-shaped region: boundary ``r(t) = radius * (1 + sum_k amps[k] cos(k t + phases[k]))``.

    Harmonic ``k = 2`` elongates the blob, higher ones make its outline irregular. The polar form gives the
    exact outline for the annotation polygon and a cheap signed distance for rendering. Lengths are in um.
    """

    centre: tuple[float, float]
    radius: float
    amps: tuple[float, ...]
    phases: tuple[float, ...]

    def boundary(self, theta: np.ndarray) -> np.ndarray:
        """Boundary radius (um) in the directions ``theta``."""
        return self._boundary(np.cos(theta), np.sin(theta))

    def _boundary(self, cos_t: np.ndarray, sin_t: np.ndarray) -> np.ndarray:
        """Boundary radius from the direction's cosine and sine (cos k t, sin k t by Chebyshev recursion,
        much cheaper than trigonometric functions on a grid)."""
        r = np.ones_like(cos_t)
        cos_k, sin_k, cos_prev, sin_prev = cos_t, sin_t, np.ones_like(cos_t), np.zeros_like(sin_t)
        for a, p in zip(self.amps, self.phases, strict=True):  # k = 2, 3, ...
            cos_k, cos_prev = 2 * cos_t * cos_k - cos_prev, cos_k
            sin_k, sin_prev = 2 * cos_t * sin_k - sin_prev, sin_k
            r += a * (cos_k * math.cos(p) - sin_k * math.sin(p))
        return self.radius * r

    @property
    def extent(self) -> float:
        """Largest distance from the centre to the boundary (an upper bound)."""
        return self.radius * (1.0 + sum(abs(a) for a in self.amps))

    @property
    def area(self) -> float:
        """Exact area (um^2), ``1/2 * integral r(t)^2 dt``."""
        return math.pi * self.radius**2 * (1.0 + 0.5 * sum(a * a for a in self.amps))

    def signed_distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Radial distance to the boundary in um, positive inside: ``r(t) - rho``.

        Not the Euclidean distance, but equal to it on the boundary and close to it nearby, which is all the
        renderer needs to draw an anti-aliased edge.
        """
        dx, dy = x - self.centre[0], y - self.centre[1]
        rho = np.hypot(dx, dy)
        safe = np.where(rho > 0, rho, 1.0)
        return self._boundary(np.where(rho > 0, dx / safe, 1.0), dy / safe) - rho

    def polygon(self, vertices: int = 128) -> np.ndarray:
        """``(vertices, 2)`` outline in um (x, y), by increasing angle (counter-clockwise with the y axis up,
        as GeoJSON asks of outer rings)."""
        theta = np.linspace(0.0, 2.0 * math.pi, vertices, endpoint=False)
        r = self.boundary(theta)
        return np.stack([self.centre[0] + r * np.cos(theta), self.centre[1] + r * np.sin(theta)], axis=1)

    def bbox(self, vertices: int = 256) -> Box:
        """``(x0, y0, x1, y1)`` of the outline (um)."""
        outline = self.polygon(vertices)
        (x0, y0), (x1, y1) = outline.min(axis=0), outline.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)

    def scaled(self, factor: float, shift: tuple[float, float]) -> Blob:
        """The blob scaled by ``factor`` about the origin, then moved by ``shift``."""
        centre = (self.centre[0] * factor + shift[0], self.centre[1] * factor + shift[1])
        return Blob(centre, self.radius * factor, self.amps, self.phases)


@dataclass(frozen=True)
class Region:
    """A suspicious region: ``kind`` is :data:`TUMOUR` or :data:`MIMIC`; ``grade`` is 0 for a mimic and a
    tumour region's grade (1 to C - 1; always 1 in a binary slide)."""

    blob: Blob
    kind: str
    grade: int


# Light let through by fully opaque ink (per RGB channel): marker inks and debris materials.
PEN_INKS = {"blue": (0.25, 0.42, 0.82), "green": (0.30, 0.62, 0.38), "black": (0.10, 0.10, 0.12)}
DEBRIS = {"dust": (0.36, 0.34, 0.33), "brown": (0.62, 0.45, 0.33), "fragment": (0.93, 0.62, 0.80)}


@dataclass(frozen=True)
class PenStroke:
    """A marker stroke on the glass: the polyline ``path`` (um) drawn ``width`` um wide in an ink that lets
    ``transmittance`` (per RGB channel) through, ``opacity`` of it absorbed where fully covered."""

    path: tuple[tuple[float, float], ...]
    width: float
    transmittance: tuple[float, float, float]
    opacity: float

    def bbox(self) -> Box:
        """``(x0, y0, x1, y1)`` around the stroke (um)."""
        points = np.asarray(self.path)
        (x0, y0), (x1, y1) = points.min(axis=0) - self.width / 2, points.max(axis=0) + self.width / 2
        return float(x0), float(y0), float(x1), float(y1)

    def signed_distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Distance (um) from points ``(x, y)`` to the stroke's edge, positive inside."""
        return self.width / 2 - _polyline_distance(np.asarray(self.path), x, y, self.width)


@dataclass(frozen=True)
class Speck:
    """A speck of debris on the glass: ``blob`` (um) of a material that lets ``transmittance`` through,
    ``opacity`` of it absorbed."""

    blob: Blob
    transmittance: tuple[float, float, float]
    opacity: float

    def bbox(self) -> Box:
        """``(x0, y0, x1, y1)`` around the speck (um)."""
        return self.blob.bbox(64)

    def signed_distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Distance (um) from points ``(x, y)`` to the speck's edge, positive inside."""
        return self.blob.signed_distance(x, y)


Mark = PenStroke | Speck


def _polyline_distance(path: np.ndarray, x: np.ndarray, y: np.ndarray, reach: float) -> np.ndarray:
    """Euclidean distance from points ``(x, y)`` to a polyline, exact up to ``reach`` (segments farther than
    that from every point are skipped; points far from all get ``-FAR``)."""
    out = np.full(np.shape(x), -FAR)
    lo_x, hi_x, lo_y, hi_y = x.min() - reach, x.max() + reach, y.min() - reach, y.max() + reach
    for (ax, ay), (bx, by) in zip(path[:-1], path[1:], strict=True):
        if max(ax, bx) < lo_x or min(ax, bx) > hi_x or max(ay, by) < lo_y or min(ay, by) > hi_y:
            continue
        vx, vy = bx - ax, by - ay
        t = np.clip(((x - ax) * vx + (y - ay) * vy) / max(vx * vx + vy * vy, 1e-12), 0.0, 1.0)
        np.minimum(out, np.hypot(x - ax - t * vx, y - ay - t * vy), out=out)
    return out


@dataclass(frozen=True)
class LayoutOptions:
    """How a slide is laid out. Lengths are in um.

    Args:
        sections: smallest and largest number of tissue sections (fewer where there is no room for one).
        tissue_extent: range of the longer side of the box around all of a slide's tissue, drawn
            log-uniformly per slide, when the slide size is not given (biopsies of a few mm up to
            resections of centimetres).
        tissue_fraction: range of the area the tissue covers in the box it is laid out in (the slide,
            when its size is given).
        glass_margin: glass around the tissue box, when the slide size is not given (room for pen marks).
        section_gap: least distance between the outlines of two sections (tissue detection takes closer
            fragments for one section).
        suspicious_regions: smallest and largest number of suspicious regions per slide (tumour plus mimic),
            drawn the same way for positive and negative slides.
        region_radius: range of a suspicious region's radius, drawn log-uniformly (at most half the radius
            of the largest section; a region that does not fit in the tissue shrinks until it does). The
            smallest default region is 12 px across at 16 um/px.
        tumour_probability: in a positive slide, the chance that each suspicious region is tumour (at least
            one always is).
        num_classes: slide classes C: 2 for diagnosis (label 1: the slide holds tumour), 3 or more for
            grading (label: the slide's grade, 0 benign to C - 1; see the module docstring).
        pen_marks: chance that a slide has marker strokes (one to three) on the glass near or over the
            tissue edge.
        debris: chance that a slide has debris or dust specks (one to six) on the glass.
    """

    sections: tuple[int, int] = (1, 3)
    tissue_extent: tuple[float, float] = (2000.0, 8000.0)
    tissue_fraction: tuple[float, float] = (0.20, 0.35)
    glass_margin: float = 500.0
    section_gap: float = 400.0
    suspicious_regions: tuple[int, int] = (2, 4)
    region_radius: tuple[float, float] = (100.0, 600.0)
    tumour_probability: float = 0.5
    num_classes: int = 2
    pen_marks: float = 0.0
    debris: float = 0.0

    def __post_init__(self) -> None:
        for name in ("sections", "suspicious_regions"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got {(lo, hi)}")
        for name, least in (("tissue_extent", 200.0), ("region_radius", 5.0)):
            lo, hi = getattr(self, name)
            if not least <= lo <= hi:
                raise ValueError(f"{name} must be (min, max) um with {least:g} <= min <= max, got {(lo, hi)}")
        lo, hi = self.tissue_fraction
        if not 0.05 <= lo <= hi <= 0.6:
            raise ValueError(f"tissue_fraction must lie in [0.05, 0.6], got {(lo, hi)}")
        if self.glass_margin < 0 or self.section_gap < 0:
            raise ValueError(
                f"glass_margin and section_gap must be >= 0 um, got {self.glass_margin}, {self.section_gap}"
            )
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        for name in ("tumour_probability", "pen_marks", "debris"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")


# Fields sampled on the low-resolution grid, in this order.
FIELD_TISSUE, FIELD_TONE = range(2)
GRID_CELLS = 512
TONE_SCALE = 200.0  # um: correlation length of the stain-tone variation
FAR = -1e6  # signed distance (um) written far outside a shape
REGION_REACH = 100.0  # um: region distances are exact up to this far outside a region, FAR beyond


@dataclass
class Scene:
    """One slide's layout, and (computed on first use) its low-resolution fields.

    ``width`` and ``height`` are the slide's size in um. ``fields[f]`` holds field ``f`` at grid nodes
    ``(i, j)`` placed at ``(x, y) = (j, i) * step`` um: the signed distance (um, positive inside) to the
    tissue, and a smooth stain-tone variation in [-1, 1]; the renderer interpolates them bilinearly.
    Suspicious regions are evaluated exactly (:meth:`region_distance`): they are small next to the grid
    step of a large slide. ``tone_seed`` seeds the tone field, ``pattern_offset`` (um) shifts the nucleus
    pattern and the textures, and ``stain`` (five values in [-1, 1]) varies this slide's hematoxylin, eosin
    and colour. ``label`` is one of ``num_classes`` classes (see the module docstring).
    """

    width: float
    height: float
    seed: int
    label: int
    tissue: list[Blob]
    regions: list[Region]
    marks: list[Mark]
    tone_seed: int
    pattern_offset: tuple[float, float]
    stain: np.ndarray = field(repr=False)
    num_classes: int

    @property
    def step(self) -> float:
        """Grid spacing in um."""
        return max(self.width, self.height) / GRID_CELLS

    def pixels(self, mpp: float) -> tuple[int, int]:
        """``(width, height)`` of the slide in px at ``mpp`` um/px."""
        return tuple(max(1, math.ceil(side / mpp - 1e-6)) for side in (self.width, self.height))

    @cached_property
    def fields(self) -> np.ndarray:
        """``(2, ny, nx)`` float32 fields (see the class docstring)."""
        step = self.step
        nx, ny = math.ceil(self.width / step) + 2, math.ceil(self.height / step) + 2
        out = np.full((2, ny, nx), FAR, dtype=np.float32)
        for blob in self.tissue:
            # evaluate around the blob only; farther nodes keep FAR, which only needs to be negative
            (cx, cy), reach = blob.centre, blob.extent + 8 * step
            j0, j1 = max(0, int((cx - reach) / step)), min(nx, int((cx + reach) / step) + 2)
            i0, i1 = max(0, int((cy - reach) / step)), min(ny, int((cy + reach) / step) + 2)
            gy, gx = np.mgrid[i0:i1, j0:j1].astype(np.float64) * step
            window = out[FIELD_TISSUE, i0:i1, j0:j1]
            np.maximum(window, blob.signed_distance(gx, gy), out=window)
        out[FIELD_TONE] = _smooth_noise(np.random.default_rng(self.tone_seed), (ny, nx), TONE_SCALE / step)
        return out

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide covered by tissue, from the grid."""
        nx, ny = int(self.width / self.step), int(self.height / self.step)
        return float((self.fields[FIELD_TISSUE, :ny, :nx] > 0).mean())

    @property
    def sections(self) -> list[Box]:
        """Box ``(x0, y0, x1, y1)`` (um) of each tissue section."""
        return [b.bbox() for b in self.tissue]

    @property
    def tissue_box(self) -> Box:
        """Box (um) around all the tissue."""
        boxes = np.array(self.sections)
        return (*boxes[:, :2].min(axis=0).tolist(), *boxes[:, 2:].max(axis=0).tolist())

    def sample(self, index: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Bilinear value of grid field ``index`` at points ``(x, y)`` (um)."""
        grid = self.fields[index]
        gx = np.clip(x / self.step, 0.0, grid.shape[1] - 1.000001)
        gy = np.clip(y / self.step, 0.0, grid.shape[0] - 1.000001)
        j, i = gx.astype(np.int64), gy.astype(np.int64)
        fx, fy = gx - j, gy - i
        top = grid[i, j] * (1 - fx) + grid[i, j + 1] * fx
        bottom = grid[i + 1, j] * (1 - fx) + grid[i + 1, j + 1] * fx
        return top * (1 - fy) + bottom * fy

    @cached_property
    def _region_boxes(self) -> np.ndarray:
        """``(regions, 4)`` boxes around the regions, :data:`REGION_REACH` wider."""
        return np.array([r.blob.bbox(64) for r in self.regions]).reshape(-1, 4) + np.array(
            [-REGION_REACH, -REGION_REACH, REGION_REACH, REGION_REACH]
        )

    def regions_near(self, box: Box) -> bool:
        """Whether a region comes within :data:`REGION_REACH` of ``box`` (um)."""
        return bool(_meets(self._region_boxes, box).any())

    def region_distance(self, kind: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed distance (um, positive inside) from points ``(x, y)`` (um) to the regions of ``kind``:
        exact up to :data:`REGION_REACH` outside them, :data:`FAR` farther."""
        out = np.full(np.shape(x), FAR)
        if np.size(x) == 0:
            return out
        lo_x, hi_x, lo_y, hi_y = np.min(x), np.max(x), np.min(y), np.max(y)
        for region in self.regions:
            (cx, cy), reach = region.blob.centre, region.blob.extent + REGION_REACH
            if region.kind != kind or cx + reach < lo_x or cx - reach > hi_x:
                continue
            if cy + reach < lo_y or cy - reach > hi_y:
                continue
            np.maximum(out, region.blob.signed_distance(x, y), out=out)
        return out

    def region_grade(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Grade (int64) of the tumour region holding each point ``(x, y)`` (um), 0 outside every one."""
        out = np.zeros(np.shape(x), dtype=np.int64)
        if np.size(x) == 0:
            return out
        box = (float(np.min(x)), float(np.min(y)), float(np.max(x)), float(np.max(y)))
        for n in np.flatnonzero(_meets(self._region_boxes, box)):
            region = self.regions[n]
            if region.kind == TUMOUR:
                out[region.blob.signed_distance(x, y) > 0] = region.grade
        return out

    @cached_property
    def _mark_boxes(self) -> np.ndarray:
        return np.array([m.bbox() for m in self.marks]).reshape(-1, 4)

    def marks_in(self, box: Box) -> list[Mark]:
        """The marks whose box meets ``box`` (um)."""
        return [self.marks[i] for i in np.flatnonzero(_meets(self._mark_boxes, box))]


def _meets(boxes: np.ndarray, box: Box) -> np.ndarray:
    """Which of ``boxes`` ``(N, 4)`` meet ``box``."""
    return (
        (boxes[:, 0] <= box[2]) & (boxes[:, 2] >= box[0]) & (boxes[:, 1] <= box[3]) & (boxes[:, 3] >= box[1])
    )


def _random_blob(
    rng: np.random.Generator, elongation: float, irregularity: float, harmonics: int = 5
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Harmonic amplitudes and phases of a blob: ``k = 2`` up to ``elongation``, the others share
    ``irregularity``."""
    amps = [rng.uniform(0.0, elongation)] + list(
        rng.uniform(0.0, irregularity, harmonics - 2) / np.arange(1, harmonics - 1)
    )
    phases = rng.uniform(0.0, 2 * math.pi, harmonics - 1)
    return tuple(float(a) for a in amps), tuple(float(p) for p in phases)


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1]))))


def _place_tissue(
    rng: np.random.Generator, width: float, height: float, options: LayoutOptions, least_area: float = 0.0
) -> list[Blob]:
    """Sections covering about ``tissue_fraction`` of a ``width`` x ``height`` box, inside it, at least the
    section gap apart. A section that does not fit shrinks a little and tries again; one that would shrink
    to half its radius, or under ``least_area``, is left out (never the first)."""
    side = min(width, height)
    count = int(rng.integers(options.sections[0], options.sections[1] + 1))
    target = rng.uniform(*options.tissue_fraction) * width * height
    shares = rng.dirichlet(np.full(count, 3.0)) * target
    pieces: list[Blob] = []
    margin = 0.03 * side
    gap = options.section_gap
    for n, area in enumerate(sorted(shares, reverse=True)):
        amps, phases = _random_blob(rng, elongation=0.2, irregularity=0.12)
        start = radius = math.sqrt(area / (math.pi * (1.0 + 0.5 * sum(a * a for a in amps))))
        while n == 0 or (radius >= 0.5 * start and area * (radius / start) ** 2 >= least_area):
            extent = radius * (1.0 + sum(amps))
            lo_x, hi_x = extent + margin, width - extent - margin
            lo_y, hi_y = extent + margin, height - extent - margin
            placed = None
            if lo_x < hi_x and lo_y < hi_y:
                for _ in range(100):
                    c = (float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y)))
                    if all(math.dist(c, p.centre) >= extent + p.extent + gap for p in pieces):
                        placed = c
                        break
            if placed is not None:
                pieces.append(Blob(placed, radius, amps, phases))
                break
            radius *= 0.95
    return pieces


def _place_regions(
    rng: np.random.Generator,
    tissue: list[Blob],
    tissue_sd: Callable[[np.ndarray, np.ndarray], np.ndarray],
    options: LayoutOptions,
) -> list[Blob]:
    """Suspicious regions inside the tissue, apart from each other. A region is at most half as wide as
    the largest section, and one that does not fit after many tries shrinks a little, the same way whatever
    the slide label."""
    boxes = np.array([b.bbox(64) for b in tissue])
    (x0, y0), (x1, y1) = boxes[:, :2].min(axis=0), boxes[:, 2:].max(axis=0)
    largest = max(b.radius for b in tissue)
    count = int(rng.integers(options.suspicious_regions[0], options.suspicious_regions[1] + 1))
    margin = min(50.0, 0.01 * min(x1 - x0, y1 - y0))
    blobs: list[Blob] = []
    for _ in range(count):
        radius = min(_log_uniform(rng, options.region_radius), 0.5 * largest)
        amps, phases = _random_blob(rng, elongation=0.15, irregularity=0.08)
        while True:
            placed = None
            tries = rng.uniform((x0, y0), (x1, y1), (200, 2))
            deep = tissue_sd(tries[:, 0], tries[:, 1]) > radius  # centres deep enough in the tissue
            for c in map(tuple, tries[deep].tolist()):
                blob = Blob(c, radius, amps, phases)
                if any(math.dist(c, b.centre) < blob.extent + b.extent + margin for b in blobs):
                    continue
                outline = blob.polygon(48)
                centre = np.asarray(c)
                outer = centre + (outline - centre) * (1.0 + margin / radius)
                if np.all(tissue_sd(outer[:, 0], outer[:, 1]) > margin):
                    placed = blob
                    break
            if placed is not None:
                blobs.append(placed)
                break
            radius *= 0.9
    return blobs


def _pen_strokes(
    rng: np.random.Generator, tissue: list[Blob], width: float, height: float
) -> list[PenStroke]:
    """One to three marker strokes following a section's outline, from inside it to beyond its edge, as
    pathologists draw them round an area of interest or along a margin."""
    strokes = []
    for _ in range(int(rng.integers(1, 4))):
        piece = tissue[int(rng.integers(len(tissue)))]
        theta = rng.uniform(0.0, 2 * math.pi) + np.linspace(0.0, rng.uniform(0.5, 2.0), 32)
        t = np.linspace(0.0, 1.0, len(theta))
        offset = rng.uniform(-200.0, 350.0) + rng.uniform(-100.0, 100.0) * t  # um beyond the outline
        r = piece.boundary(theta) + offset
        x = np.clip(piece.centre[0] + r * np.cos(theta), 0.0, width)
        y = np.clip(piece.centre[1] + r * np.sin(theta), 0.0, height)
        strokes.append(
            PenStroke(
                path=tuple((float(a), float(b)) for a, b in zip(x, y, strict=True)),
                width=float(rng.uniform(150.0, 400.0)),
                transmittance=PEN_INKS[str(rng.choice(list(PEN_INKS)))],
                opacity=float(rng.uniform(0.8, 0.95)),
            )
        )
    return strokes


def _debris(rng: np.random.Generator, width: float, height: float) -> list[Speck]:
    """One to six specks of dust, brown debris or stray tissue fragments anywhere on the slide, each
    smaller than 0.05 mm^2."""
    specks = []
    for _ in range(int(rng.integers(1, 7))):
        amps, phases = _random_blob(rng, elongation=0.3, irregularity=0.2)
        centre = (float(rng.uniform(0.05, 0.95) * width), float(rng.uniform(0.05, 0.95) * height))
        speck = Blob(centre, _log_uniform(rng, (15.0, 90.0)), amps, phases)
        material = DEBRIS[str(rng.choice(list(DEBRIS)))]
        specks.append(Speck(speck, material, opacity=float(rng.uniform(0.7, 0.95))))
    return specks


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_cells: float) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to [-1, 1] (FFT blur, whose wrap-around is harmless here)."""
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    kernel = np.exp(-2.0 * (math.pi * sigma_cells) ** 2 * (fx**2 + fy**2))
    smooth = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=shape)
    return smooth / max(float(np.abs(smooth).max()), 1e-12)


def _region_grades(rng: np.random.Generator, tumour: np.ndarray, grade: int) -> np.ndarray:
    """Grades of the regions of a slide of grade ``grade``: 0 for mimics, ``grade`` for one tumour region
    and a grade drawn uniformly from 1 to ``grade`` for each other one."""
    grades = np.zeros(len(tumour), dtype=np.int64)
    which = np.flatnonzero(tumour)
    if len(which):
        grades[which] = rng.integers(1, grade + 1, len(which))
        grades[which[rng.integers(len(which))]] = grade
    return grades


def make_scene(
    seed: int,
    positive: int,
    options: LayoutOptions | None = None,
    size: float | tuple[float, float] | None = None,
) -> Scene:
    """Lay out one slide: shapes only (fields are computed when first used), so it is cheap to call.

    Args:
        seed: the slide's seed (>= 0); the same seed gives the same layout.
        positive: the slide's label, in ``0 .. options.num_classes - 1``: above 0 (``True`` is 1) the slide
            contains tumour, of that grade when ``options.num_classes`` is 3 or more.
        options: layout options (defaults if ``None``).
        size: the slide's side, or ``(width, height)``, in um: the tissue covers a fraction of it. ``None``:
            the tissue spans an extent drawn from ``options.tissue_extent`` and the slide is that plus the
            glass margin.

    Returns:
        The :class:`Scene`.
    """
    options = options or LayoutOptions()
    label = int(positive)
    if not 0 <= label < options.num_classes:
        raise ValueError(f"a slide label must lie in 0 .. {options.num_classes - 1}, got {label}")
    rng = np.random.default_rng(seed)
    if size is not None:
        width, height = (float(size), float(size)) if np.isscalar(size) else (float(size[0]), float(size[1]))
        if min(width, height) < 100.0:
            raise ValueError(f"a synthetic slide must be at least 100 um a side, got {width} x {height}")
        tissue = _place_tissue(rng, width, height, options)
    else:
        extent = _log_uniform(rng, options.tissue_extent)
        # sections of at least 0.1 mm^2 (the layout is then scaled up, if anything): smaller is debris
        tissue = _place_tissue(rng, extent, extent * rng.uniform(0.5, 1.0), options, least_area=1e5)
        boxes = np.array([b.bbox() for b in tissue])
        (x0, y0), (x1, y1) = boxes[:, :2].min(axis=0), boxes[:, 2:].max(axis=0)
        factor = extent / max(x1 - x0, y1 - y0)  # the longer side of the tissue box is the extent
        margin = options.glass_margin
        tissue = [b.scaled(factor, (margin - x0 * factor, margin - y0 * factor)) for b in tissue]
        width, height = (x1 - x0) * factor + 2 * margin, (y1 - y0) * factor + 2 * margin

    def tissue_at(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.max([b.signed_distance(x, y) for b in tissue], axis=0)

    blobs = _place_regions(rng, tissue, tissue_at, options)
    tone_seed = int(rng.integers(1 << 62))
    pattern_offset = (float(rng.uniform(0, 1 << 18)), float(rng.uniform(0, 1 << 18)))
    stain = rng.uniform(-1.0, 1.0, 5)

    marks: list[Mark] = []
    pen_rng, debris_rng = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])
    if pen_rng.random() < options.pen_marks:
        marks += _pen_strokes(pen_rng, tissue, width, height)
    if debris_rng.random() < options.debris:
        marks += _debris(debris_rng, width, height)

    # Label-dependent draws last: the layout above is the same distribution for every label.
    if label:
        tumour = rng.random(len(blobs)) < options.tumour_probability
        if not tumour.any():
            tumour[rng.integers(len(blobs))] = True
    else:
        tumour = np.zeros(len(blobs), dtype=bool)
    grades = _region_grades(np.random.default_rng([seed, 3]), tumour, label)
    regions = [
        Region(b, TUMOUR if t else MIMIC, int(g)) for b, t, g in zip(blobs, tumour, grades, strict=True)
    ]
    return Scene(
        width,
        height,
        int(seed),
        label,
        tissue,
        regions,
        marks,
        tone_seed,
        pattern_offset,
        stain,
        options.num_classes,
    )
