"""Layout of one synthetic slide: tissue pieces, suspicious regions, and the low-resolution fields that
the tile renderer interpolates.

Everything here is in level-0 pixel coordinates and is decided before any pixel is drawn, from one seed.
Region sizes are fractions of the slide side, so that a region keeps the same size on the thumbnail a first
SMT layer sees whatever the slide size. The draws that depend on the slide label come last, so that the
number, size and place of the suspicious regions follow the same distribution in positive and negative
slides: a positive slide only turns some of its suspicious regions into tumour, a negative one keeps them
all as benign mimics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

TUMOUR = "Tumor"
MIMIC = "Mimic"


@dataclass(frozen=True)
class Blob:
    """A smooth star-shaped region: boundary ``r(t) = radius * (1 + sum_k amps[k] cos(k t + phases[k]))``.

    Harmonic ``k = 2`` elongates the blob, higher ones make its outline irregular. The polar form gives the
    exact outline for the annotation polygon and a cheap signed distance for rendering.
    """

    centre: tuple[float, float]
    radius: float
    amps: tuple[float, ...]
    phases: tuple[float, ...]

    def boundary(self, theta: np.ndarray) -> np.ndarray:
        """Boundary radius (level-0 px) in the directions ``theta``."""
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
        """Exact area, ``1/2 * integral r(t)^2 dt``."""
        return math.pi * self.radius**2 * (1.0 + 0.5 * sum(a * a for a in self.amps))

    def signed_distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Radial distance to the boundary in px, positive inside: ``r(t) - rho``.

        Not the Euclidean distance, but equal to it on the boundary and close to it nearby, which is all the
        renderer needs to draw an anti-aliased edge.
        """
        dx, dy = x - self.centre[0], y - self.centre[1]
        rho = np.hypot(dx, dy)
        safe = np.where(rho > 0, rho, 1.0)
        return self._boundary(np.where(rho > 0, dx / safe, 1.0), dy / safe) - rho

    def polygon(self, vertices: int = 128) -> np.ndarray:
        """``(vertices, 2)`` outline in level-0 px (x, y), by increasing angle (counter-clockwise with the y
        axis up, as GeoJSON asks of outer rings)."""
        theta = np.linspace(0.0, 2.0 * math.pi, vertices, endpoint=False)
        r = self.boundary(theta)
        return np.stack([self.centre[0] + r * np.cos(theta), self.centre[1] + r * np.sin(theta)], axis=1)


@dataclass(frozen=True)
class Region:
    """A suspicious region: ``kind`` is :data:`TUMOUR` or :data:`MIMIC`."""

    blob: Blob
    kind: str


@dataclass(frozen=True)
class LayoutOptions:
    """How a slide is laid out. Sizes are fractions of the slide side.

    Args:
        tissue_pieces: smallest and largest number of tissue pieces.
        tissue_fraction: range of the slide area the tissue aims to cover.
        suspicious_regions: smallest and largest number of suspicious regions per slide (tumour plus mimic),
            drawn the same way for positive and negative slides.
        region_radius: range of a suspicious region's radius, as a fraction of the slide side. The smallest
            default region is about 4 px across at downsample 64 on a 4096-px slide (15 px on 16384).
        tumour_probability: in a positive slide, the chance that each suspicious region is tumour (at least
            one always is).
    """

    tissue_pieces: tuple[int, int] = (1, 3)
    tissue_fraction: tuple[float, float] = (0.30, 0.45)
    suspicious_regions: tuple[int, int] = (2, 4)
    region_radius: tuple[float, float] = (0.03, 0.06)
    tumour_probability: float = 0.5

    def __post_init__(self) -> None:
        for name in ("tissue_pieces", "suspicious_regions"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got {(lo, hi)}")
        lo, hi = self.tissue_fraction
        if not 0.05 <= lo <= hi <= 0.6:
            raise ValueError(f"tissue_fraction must lie in [0.05, 0.6], got {(lo, hi)}")
        lo, hi = self.region_radius
        if not 0.0 < lo <= hi <= 0.15:
            raise ValueError(
                f"region_radius must be fractions of the slide side in (0, 0.15], got {(lo, hi)}"
            )
        if not 0.0 <= self.tumour_probability <= 1.0:
            raise ValueError(f"tumour_probability must lie in [0, 1], got {self.tumour_probability}")


# Fields sampled on the low-resolution grid, in this order.
FIELD_TISSUE, FIELD_TUMOUR, FIELD_MIMIC, FIELD_TONE = range(4)
GRID_CELLS = 512
FAR = -1e6  # signed distance (px) written far outside a shape


@dataclass
class Scene:
    """One slide's layout, and (computed on first use) its low-resolution fields.

    ``fields[f]`` holds field ``f`` at grid nodes ``(i, j)`` placed at level-0 ``(x, y) = (j, i) * step``:
    the signed distances (px, positive inside) to the tissue, to the tumour regions and to the mimic
    regions, and a smooth stain-tone variation in [-1, 1]. The renderer interpolates them bilinearly. The
    grid also covers the padding of the last row and column of 256-px tiles. ``tone_seed`` seeds the tone
    field, ``pattern_offset`` shifts the nucleus pattern and the textures, and ``stain`` (five values in
    [-1, 1]) varies this slide's hematoxylin, eosin and colour.
    """

    width: int
    height: int
    seed: int
    label: int
    tissue: list[Blob]
    regions: list[Region]
    tone_seed: int
    pattern_offset: tuple[float, float]
    stain: np.ndarray = field(repr=False)

    @property
    def step(self) -> float:
        """Grid spacing in level-0 px."""
        return max(self.width, self.height) / GRID_CELLS

    @cached_property
    def fields(self) -> np.ndarray:
        """``(4, ny, nx)`` float32 fields (see the class docstring)."""
        step = self.step
        nx, ny = int(math.ceil((self.width + 256) / step)) + 2, int(math.ceil((self.height + 256) / step)) + 2
        out = np.full((4, ny, nx), FAR, dtype=np.float32)
        shapes = [(FIELD_TISSUE, b) for b in self.tissue]
        shapes += [(FIELD_TUMOUR if r.kind == TUMOUR else FIELD_MIMIC, r.blob) for r in self.regions]
        for index, blob in shapes:
            # evaluate around the blob only; farther nodes keep FAR, which only needs to be negative
            (cx, cy), reach = blob.centre, blob.extent + 8 * step
            j0, j1 = max(0, int((cx - reach) / step)), min(nx, int((cx + reach) / step) + 2)
            i0, i1 = max(0, int((cy - reach) / step)), min(ny, int((cy + reach) / step) + 2)
            gy, gx = np.mgrid[i0:i1, j0:j1].astype(np.float64) * step
            window = out[index, i0:i1, j0:j1]
            np.maximum(window, blob.signed_distance(gx, gy), out=window)
        out[FIELD_TONE] = _smooth_noise(np.random.default_rng(self.tone_seed), (ny, nx), GRID_CELLS / 24)
        return out

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide covered by tissue, from the grid."""
        nx, ny = int(self.width / self.step), int(self.height / self.step)
        return float((self.fields[FIELD_TISSUE, :ny, :nx] > 0).mean())

    def sample(self, index: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Bilinear value of field ``index`` at level-0 points ``(x, y)``."""
        grid = self.fields[index]
        gx = np.clip(x / self.step, 0.0, grid.shape[1] - 1.000001)
        gy = np.clip(y / self.step, 0.0, grid.shape[0] - 1.000001)
        j, i = gx.astype(np.int64), gy.astype(np.int64)
        fx, fy = gx - j, gy - i
        top = grid[i, j] * (1 - fx) + grid[i, j + 1] * fx
        bottom = grid[i + 1, j] * (1 - fx) + grid[i + 1, j + 1] * fx
        return top * (1 - fy) + bottom * fy


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


def _place_tissue(rng: np.random.Generator, width: int, height: int, options: LayoutOptions) -> list[Blob]:
    """Tissue pieces covering about ``tissue_fraction`` of the slide, inside it, overlapping little."""
    side = min(width, height)
    count = int(rng.integers(options.tissue_pieces[0], options.tissue_pieces[1] + 1))
    target = rng.uniform(*options.tissue_fraction) * width * height
    shares = rng.dirichlet(np.full(count, 3.0)) * target
    pieces: list[Blob] = []
    margin = 0.03 * side
    for area in sorted(shares, reverse=True):
        amps, phases = _random_blob(rng, elongation=0.2, irregularity=0.12)
        radius = math.sqrt(area / (math.pi * (1.0 + 0.5 * sum(a * a for a in amps))))
        while True:
            extent = radius * (1.0 + sum(amps))
            lo_x, hi_x = extent + margin, width - extent - margin
            lo_y, hi_y = extent + margin, height - extent - margin
            placed = None
            if lo_x < hi_x and lo_y < hi_y:
                for _ in range(100):
                    c = (float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y)))
                    if all(math.dist(c, p.centre) >= 0.8 * (extent + p.extent) for p in pieces):
                        placed = c
                        break
            if placed is not None:
                pieces.append(Blob(placed, radius, amps, phases))
                break
            radius *= 0.95
    return pieces


def _place_regions(
    rng: np.random.Generator,
    width: int,
    height: int,
    tissue_sd: Callable[[np.ndarray, np.ndarray], np.ndarray],
    options: LayoutOptions,
) -> list[Blob]:
    """Suspicious regions inside the tissue, apart from each other. A region that does not fit after many
    tries shrinks a little, the same way whatever the slide label."""
    side = min(width, height)
    count = int(rng.integers(options.suspicious_regions[0], options.suspicious_regions[1] + 1))
    margin = 0.01 * side
    blobs: list[Blob] = []
    for _ in range(count):
        radius = rng.uniform(*options.region_radius) * side
        amps, phases = _random_blob(rng, elongation=0.15, irregularity=0.08)
        while True:
            placed = None
            for _ in range(200):
                c = (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
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


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_cells: float) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to [-1, 1] (FFT blur, whose wrap-around is harmless here)."""
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    kernel = np.exp(-2.0 * (math.pi * sigma_cells) ** 2 * (fx**2 + fy**2))
    smooth = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=shape)
    return smooth / max(float(np.abs(smooth).max()), 1e-12)


def make_scene(
    size: int | tuple[int, int], seed: int, positive: bool, options: LayoutOptions | None = None
) -> Scene:
    """Lay out one slide: shapes only (fields are computed when first used), so it is cheap to call.

    Args:
        size: slide side in level-0 px, or ``(width, height)``.
        seed: the slide's seed; the same seed gives the same layout.
        positive: whether the slide contains tumour.
        options: layout options (defaults if ``None``).

    Returns:
        The :class:`Scene`.
    """
    options = options or LayoutOptions()
    width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(width, height) < 512:
        raise ValueError(f"a synthetic slide must be at least 512 px on each side, got {width} x {height}")
    rng = np.random.default_rng(seed)
    tissue = _place_tissue(rng, width, height, options)

    def tissue_at(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.max([b.signed_distance(x, y) for b in tissue], axis=0)

    blobs = _place_regions(rng, width, height, tissue_at, options)
    tone_seed = int(rng.integers(1 << 62))
    pattern_offset = (float(rng.uniform(0, 1 << 20)), float(rng.uniform(0, 1 << 20)))
    stain = rng.uniform(-1.0, 1.0, 5)

    # Label-dependent draws last: the layout above is the same distribution for both labels.
    if positive:
        tumour = rng.random(len(blobs)) < options.tumour_probability
        if not tumour.any():
            tumour[rng.integers(len(blobs))] = True
    else:
        tumour = np.zeros(len(blobs), dtype=bool)
    regions = [Region(b, TUMOUR if t else MIMIC) for b, t in zip(blobs, tumour, strict=True)]
    return Scene(width, height, int(seed), int(positive), tissue, regions, tone_seed, pattern_offset, stain)
