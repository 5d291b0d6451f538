"""Level-0 tiles of a synthetic slide, rendered one at a time from the :class:`~.scene.Scene` at a given mpp.

The specimen is described in micrometres (the scene, and the :class:`Appearance` of its cells); pixels
appear only here, so the same scene rendered at 0.5 um/px is its 0.25 um/px rendering at half the pixel
size. A tile depends only on its position, so a slide of any size streams with constant memory:

- Smooth things (tissue outline, stain tone) are bilinear interpolations of the scene's low-resolution
  fields; suspicious-region outlines, pen strokes and debris are exact distances on a lattice of 8 px.
- Nuclei sit on a fixed periodic Poisson-disc pattern (minimum centre distance ``spacing``). Every pattern
  point gets its random marks (is it occupied, size, shape, ink, ...) from a hash of its absolute position
  and the slide seed, so a nucleus that straddles two tiles is drawn identically in both, and at any mpp.
  A pixel coarser than :data:`REFERENCE_MPP` integrates its nuclei over its area (the mean of samples at
  most that far apart), so a 20x rendering is the area average of the 40x one, nucleoli and granules
  included (``tests/test_synth.py``).
- Fine textures (chromatin granules, stroma fibres, ragged tissue edges, nests) are periodic noise images
  made at :data:`REFERENCE_MPP` and area-resampled to the slide's mpp; pixel noise stays one value per
  pixel, as a camera's.
- Pen strokes and debris on the glass absorb light over whatever lies below them.

The task SMT is for, suspicious at low magnification and decidable only at high magnification, shapes the
nuclei. Tumour and mimic regions share the point pattern, the occupancy, the cytoplasm and the ink colour,
and what is drawn at each pattern point carries the same integrated ink (darkness times area), from the same
distribution; a pyramid level at 4 um/px or coarser, an area average, then shows both with the same mean
colour. Their difference is inside the nuclei: a tumour point holds one large, pleomorphic (size,
elongation, irregular outline), vesicular nucleus (pale, with a granular rim and a nucleolus); a mimic point
two small, round, uniform, dark lymphoid nuclei. Three leaks that a prototype of such data showed are
closed here, and ``tests/test_synth.py`` checks, at 0.25 and 0.5 um/px, that a classifier on colour and
texture statistics stays near chance at 4 to 16 um/px while it separates the two at level 0:

- clipping: a pixel darker than black loses ink, so dark, overlapping or granular nuclei come out lighter
  when averaged (the mimic's green channel did). Ink per pixel is capped (``max_ink``) below saturation.
- blur: a large pale nucleus loses more contrast to area averaging than a small dark one, so the local
  variance at 4 um/px gave tumour away. The distance between the two mimic nuclei is fitted
  (:func:`fit_mimic_separation`, at the slide's mpp) so that both classes keep the same variance and
  gradient energy there.
- colour: a nucleolus in a colour of its own blurs differently from the rest of the nucleus, so channel
  ratios of the local variance gave tumour away. All nuclear ink has one colour.

Grading (``LayoutOptions.num_classes`` C >= 3) uses the same two kinds of point. A tumour region of grade
g is a mix: each of its occupied pattern points holds the tumour nucleus with probability ``(g + 1) / C``,
decided by a hash of the point (its own, so that every other mark stays as it is), and a mimic pair
otherwise. Both kinds carry the same integrated ink and, at :data:`FIT_BOX`, the same variance and gradient
energy, so a mix of them does too: at low magnification a tumour region of any grade looks like a mimic
region, and a thumbnail shows where to look but not the grade; at full resolution the grade is the share of
large pleomorphic nuclei among the lymphoid-like pairs, rising with it (``tests/test_synth_grading.py``
checks both for the lowest and the highest grade). With C = 2 a tumour region (grade 1) holds tumour nuclei
only.

``Appearance.low_mag_tumour_contrast`` opens one leak on purpose, for data where a first layer can do
better than chance on the thumbnail (as on CAMELYON16): tumour points carry more ink, so tumour regions are
darker than mimics at every magnification, and the mimics stay as they are (graded regions in proportion to
their share of tumour points, so the grade then shows at low magnification too).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from smt_monai.data.synth.scene import FIELD_TISSUE, MIMIC, TUMOUR, Mark, Scene

TILE = 256
REFERENCE_MPP = 0.25  # um/px at which the textures are made
TEXTURE = 1024  # side of the textures at REFERENCE_MPP, in px (256 um)
PATTERN_PERIOD = 512.0  # um: period of the nucleus pattern
LATTICE = 8  # px between the points at which a tile's region and mark distances are evaluated exactly
FIT_BOX = 4.0  # um: the area average at which fit_mimic_separation matches tumour and mimic
MPP_RANGE = (0.2, 2.0)  # um/px a slide may be rendered at
TUMOUR_CONTRAST_INK = 4.0  # extra integrated ink of a tumour point, relative, at low_mag_tumour_contrast 1

# Colours (0-255), and intensity removed per unit of stain.
GLASS = np.array([242.0, 241.0, 240.0], dtype=np.float32)
STROMA = np.array([240.0, 178.0, 208.0], dtype=np.float32)
CYTOPLASM = np.array([214.0, 168.0, 210.0], dtype=np.float32)
HEMATOXYLIN = np.array([128.0, 130.0, 70.0], dtype=np.float32)
EOSIN = np.array([6.0, 42.0, 18.0], dtype=np.float32)
BORDER = np.array([18.0, 18.0, 18.0], dtype=np.float32)


@dataclass(frozen=True)
class Appearance:
    """Cell-level look of a synthetic slide, in um. See the module docstring for the reasoning.

    Args:
        spacing: minimum distance between pattern points (nucleus centres, or mimic nucleus-pair centres).
        normal_occupancy: fraction of pattern points holding a stroma nucleus in normal tissue.
        suspicious_occupancy: the same inside tumour and mimic regions (scaled by a smooth "nest" texture).
        mimic_radius: mean radius of each of the two lymphoid nuclei at a mimic point.
        tumour_radius: range of tumour nucleus radii.
        ink: mean integrated ink (ink x um^2) at a tumour or mimic point; one unit of ink on a pixel removes
            :data:`HEMATOXYLIN` from its colour.
        ink_cv: coefficient of variation of a point's integrated ink (the same for tumour and mimic).
        max_ink: most ink on one pixel of a tumour nucleus, so that no pixel saturates.
        nucleolus: ink of a tumour nucleolus relative to the rest of its nucleus.
        edge: width over which cell density rises inside a suspicious region's outline.
        noise: standard deviation of the pixel noise (intensity levels, per pixel whatever the mpp).
        tone: relative amplitude of the smooth variation of eosin staining across the slide.
        mimic_separation: distance between the two nuclei of a mimic point; ``None``: fitted to the other
            parameters at the slide's mpp by :func:`fit_mimic_separation` (which takes a couple of seconds).
        low_mag_tumour_contrast: how much darker tumour regions are than mimics, from 0 (alike at 4 um/px and
            coarser) to 1 (five times the ink: dark and granular on any thumbnail): a tumour point carries
            ``1 + TUMOUR_CONTRAST_INK * low_mag_tumour_contrast`` times the integrated ink ``ink``. A
            first layer trained from scratch on about 70 slides learns nothing from 1.5 times the ink
            (0.125), which a colour statistic already separates, and learns the slide label at about 0.25
            to 0.5 (see docs/benchmarks.md, "Toward the paper's regime").
    """

    spacing: float = 4.0
    normal_occupancy: float = 0.06
    suspicious_occupancy: float = 0.9
    mimic_radius: float = 0.7
    tumour_radius: tuple[float, float] = (1.05, 1.55)
    ink: float = 1.625
    ink_cv: float = 0.15
    max_ink: float = 0.8
    nucleolus: float = 0.15
    edge: float = 6.0
    noise: float = 1.5
    tone: float = 0.5
    mimic_separation: float | None = None
    low_mag_tumour_contrast: float = 0.0

    @property
    def tumour_ink(self) -> float:
        """Mean integrated ink of a tumour point (``ink`` raised by ``low_mag_tumour_contrast``)."""
        return self.ink * (1.0 + TUMOUR_CONTRAST_INK * self.low_mag_tumour_contrast)


def check_mpp(mpp: float) -> float:
    """``mpp`` as a float, or ValueError when a slide cannot be rendered at it."""
    if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        raise ValueError(f"mpp must lie in [{MPP_RANGE[0]}, {MPP_RANGE[1]}] um/px, got {mpp}")
    return float(mpp)


# ---------------------------------------------------------------------------------------------------------
# Deterministic randomness: a counter-based hash, periodic textures, the nucleus pattern


def _splitmix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wraps around on overflow, as intended)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_uniform(keys: np.ndarray, streams: int) -> np.ndarray:
    """``(len(keys), streams)`` uniforms in [0, 1), a pure function of each uint64 key and stream index."""
    offsets = (np.arange(1, streams + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))[None, :]
    bits = _splitmix(keys.astype(np.uint64)[:, None] + offsets)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _periodic_blur(noise: np.ndarray, sigma: tuple[float, float], angle: float = 0.0) -> np.ndarray:
    """Periodic Gaussian blur (FFT), anisotropic with ``sigma = (along, across)`` rotated by ``angle``."""
    fy = np.fft.fftfreq(noise.shape[0])[:, None]
    fx = np.fft.rfftfreq(noise.shape[1])[None, :]
    u = fx * math.cos(angle) + fy * math.sin(angle)
    v = -fx * math.sin(angle) + fy * math.cos(angle)
    kernel = np.exp(-2.0 * math.pi**2 * ((sigma[0] * u) ** 2 + (sigma[1] * v) ** 2))
    out = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=noise.shape)
    return out / out.std()


def _to_unit(field: np.ndarray) -> np.ndarray:
    """Map a field to [0, 1] through its ranks, so its histogram is flat whatever the blur."""
    ranks = np.empty(field.size, dtype=np.float32)
    ranks[np.argsort(field, axis=None)] = np.linspace(0.0, 1.0, field.size, dtype=np.float32)
    return ranks.reshape(field.shape)


def resample_periodic(texture: np.ndarray, size: int) -> np.ndarray:
    """A square periodic texture resampled to ``size`` px per period, each new pixel the area average of
    the texels it covers (texels it covers in part weighted by that part).

    So a texture made for 0.25 um/px, resampled to half its side, is exactly what a camera with 0.5 um
    pixels sees of it.
    """
    n = texture.shape[0]
    scale = n / size  # texels per new pixel
    start = np.arange(size) * scale
    weights = np.zeros((size, n))
    for step in range(math.ceil(scale) + 1):
        texel = np.floor(start).astype(np.int64) + step
        overlap = np.clip(np.minimum(start + scale, texel + 1) - np.maximum(start, texel), 0.0, None)
        np.add.at(weights, (np.arange(size), texel % n), overlap / scale)
    return (weights @ texture.astype(np.float64) @ weights.T).astype(np.float32)


@dataclass(frozen=True)
class Textures:
    """Periodic noise images shared by all slides (fixed seed), at one mpp: ``pixel`` has a period of
    ``TEXTURE`` px whatever the mpp (camera noise), the others a period of 256 um. Each is stored with
    ``TILE`` wrapped-around extra rows and columns, so that a tile-sized block is always a view."""

    pixel: np.ndarray  # white noise, standard normal
    chromatin: np.ndarray  # granules about 0.25 um, in [0, 1]
    fibre: np.ndarray  # stroma fibres: crossing streaks, in [0, 1]
    rough: np.ndarray  # ragged tissue edges, about 3 um, standard normal
    nest: np.ndarray  # cell-density variation inside regions, about 10 um, in [0, 1]


@lru_cache(maxsize=1)
def _reference_noise() -> dict[str, np.ndarray]:
    """The textures at :data:`REFERENCE_MPP`, one period each."""
    rng = np.random.default_rng(20240601)
    shape = (TEXTURE, TEXTURE)

    def noise() -> np.ndarray:
        return rng.standard_normal(shape)

    fibre = _periodic_blur(noise(), (14.0, 1.2), 0.5) + _periodic_blur(noise(), (14.0, 1.2), 2.2)
    return {
        "pixel": noise().astype(np.float32),
        "chromatin": _to_unit(_periodic_blur(noise(), (0.9, 0.9))),
        "fibre": _to_unit(fibre),
        "rough": _periodic_blur(noise(), (12.0, 12.0)).astype(np.float32),
        "nest": _to_unit(_periodic_blur(noise(), (40.0, 40.0))),
    }


@lru_cache(maxsize=4)
def textures(mpp: float = REFERENCE_MPP) -> Textures:
    """The shared textures as seen at ``mpp`` um/px (area-resampled), made once per process."""
    size = round(TEXTURE * REFERENCE_MPP / mpp)
    out = {}
    for name, texture in _reference_noise().items():
        if name != "pixel" and size != TEXTURE:
            texture = resample_periodic(texture, size)
        out[name] = np.pad(texture, ((0, TILE), (0, TILE)), mode="wrap")
    return Textures(**out)


def texture_period(texture: np.ndarray) -> int:
    """Period in px of one of the :class:`Textures`."""
    return texture.shape[0] - TILE


def sample_texture(texture: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Texture values at integer pixel coordinates (any shape), wrapping around."""
    period = texture_period(texture)
    return texture[np.asarray(y, dtype=np.int64) % period, np.asarray(x, dtype=np.int64) % period]


def texture_block(texture: np.ndarray, y0: int, x0: int, size: int = TILE) -> np.ndarray:
    """A ``size`` x ``size`` block (read-only view when ``size`` is at most ``TILE``) of a texture at
    absolute pixel ``(x0, y0)``, wrapping around."""
    period = texture_period(texture)
    y0, x0 = y0 % period, x0 % period
    if size <= TILE:
        return texture[y0 : y0 + size, x0 : x0 + size]
    return texture[np.ix_(np.arange(y0, y0 + size) % period, np.arange(x0, x0 + size) % period)]


@lru_cache(maxsize=4)
def poisson_disc_pattern(spacing: float, period: float = PATTERN_PERIOD, seed: int = 7) -> np.ndarray:
    """Points in a periodic ``period`` x ``period`` square (um), no two closer than ``spacing`` (with
    wrap-around).

    Vectorised random sequential adsorption: each round throws candidates, drops those too close to a kept
    point, and among the rest keeps those with no closer, earlier candidate. After the rounds the pattern is
    near saturation (about 0.55 of the plane covered by discs of diameter ``spacing``).

    Returns:
        ``(N, 2)`` float64 points ``(x, y)``.
    """
    rng = np.random.default_rng(seed)
    cells = int(period // (spacing / math.sqrt(2.0)))
    cell = period / cells  # at most one point per cell
    reach = int(math.ceil(spacing / cell))
    shifts = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)]
    grid = np.full((cells, cells), -1, dtype=np.int64)
    points = np.empty((0, 2))

    def too_close(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = a - b
        d -= period * np.round(d / period)
        return (d**2).sum(axis=1) < spacing**2

    for _ in range(40):
        cand = rng.random((cells * cells, 2)) * period
        ci = np.minimum((cand // cell).astype(np.int64), cells - 1)
        ok = grid[ci[:, 1], ci[:, 0]] < 0
        for dy, dx in shifts:
            j = grid[(ci[:, 1] + dy) % cells, (ci[:, 0] + dx) % cells]
            has = ok & (j >= 0)
            ok[has] = ~too_close(cand[has], points[j[has]])
        cand, ci = cand[ok], ci[ok]
        _, first = np.unique(ci[:, 1] * cells + ci[:, 0], return_index=True)
        first = rng.permutation(first)
        cand, ci = cand[first], ci[first]
        order = np.arange(len(cand))
        local = np.full((cells, cells), -1, dtype=np.int64)
        local[ci[:, 1], ci[:, 0]] = order
        keep = np.ones(len(cand), dtype=bool)
        for dy, dx in shifts:
            j = local[(ci[:, 1] + dy) % cells, (ci[:, 0] + dx) % cells]
            has = (j >= 0) & (j < order)
            keep[has] &= ~too_close(cand[has], cand[j[has]])
        cand, ci = cand[keep], ci[keep]
        grid[ci[:, 1], ci[:, 0]] = np.arange(len(points), len(points) + len(cand))
        points = np.concatenate([points, cand])
    return points


# ---------------------------------------------------------------------------------------------------------
# Nuclei


# Random streams per pattern point.
_OCCUPY, _SIZE, _ELONG, _ORIENT, _H3, _P3, _H4, _P4, _INK, _NUC_A, _NUC_R, _NUC_S = range(12)
_STREAMS = 12
# Key of the draw deciding tumour or mimic at a point of a graded tumour region: a stream of its own rather
# than one more in _STREAMS, which would change every mark of every slide.
_GRADE_KEY = np.uint64(0x6A09E667F3BCC908)
_NORMAL, _MIMIC, _TUMOUR = 0, 1, 2
# candidate mimic nucleus-pair distances (um)
SEPARATIONS = tuple(float(s) for s in np.arange(1.0, 2.5001, 0.0625))


@dataclass
class Nuclei:
    """Occupied pattern points of one class near a tile: centres (tile px) and random marks."""

    x: np.ndarray
    y: np.ndarray
    u: np.ndarray  # (M, _STREAMS) uniforms


@dataclass
class NucleusWindows:
    """What is drawn at each point, on its own square window: window origins (tile coordinates), pixel
    offsets from the point, the ink profile (summing to 1 over the window) and the integrated ink (ink x
    px)."""

    ox: np.ndarray
    oy: np.ndarray
    dx: np.ndarray  # (M, 1, win)
    dy: np.ndarray  # (M, win, 1)
    profile: np.ndarray  # (M, win, win)
    total: np.ndarray  # (M,)


def _col(v: np.ndarray | float) -> np.ndarray:
    return np.asarray(v, dtype=np.float32).reshape(-1, 1, 1)


def _unit(profile: np.ndarray) -> np.ndarray:
    """Profiles scaled to sum 1 over each window."""
    return profile / np.maximum(profile.sum(axis=(1, 2), keepdims=True), 1e-12)


def _max_extent(look: Appearance) -> float:
    """Largest distance (um) from a pattern point to the edge of the ink drawn there, any class."""
    tumour = look.tumour_radius[1] * math.sqrt(1.35) * 1.17
    mimic = 0.55 * SEPARATIONS[-1] + 1.05 * look.mimic_radius
    return max(2.25, tumour, mimic) + 0.25


def _nucleus_windows(
    kind: int, nuclei: Nuclei, look: Appearance, mpp: float, tile_x: int, tile_y: int, separation: float
) -> NucleusWindows:
    """Draw what sits at each pattern point of one class on its own window of pixels at ``mpp``.

    Tumour: one large pleomorphic nucleus, ink concentrated in granules along its rim, and a nucleolus.
    Mimic: two small round dark nuclei about ``separation`` um apart (lymphoid tissue: smaller and more
    numerous nuclei). Normal: one spindle-shaped stroma nucleus. Shapes are in um, outlines anti-aliased
    over one sample. A pixel coarser than :data:`REFERENCE_MPP` is the mean of ``s x s`` samples at most
    that far apart (as a camera integrates over its pixel), so that structure finer than the pixel (a
    nucleolus, granules, the rim) averages as at 40x instead of being point-sampled.
    """
    u = nuclei.u
    m = len(u)
    angle = u[:, _ORIENT] * math.pi
    spread = 1.0 + look.ink_cv * math.sqrt(3.0) * (2.0 * u[:, _INK] - 1.0)
    if kind == _NORMAL:
        a, b = 1.5 + 0.75 * u[:, _SIZE], 0.45 + 0.15 * u[:, _ELONG]
    elif kind == _MIMIC:
        a = b = look.mimic_radius * (0.95 + 0.1 * u[:, _SIZE])
    else:
        r = look.tumour_radius[0] + (look.tumour_radius[1] - look.tumour_radius[0]) * u[:, _SIZE]
        e = 1.0 + 0.35 * u[:, _ELONG]
        a, b = r * np.sqrt(e), r / np.sqrt(e)
    pair = 0.5 * separation * (0.9 + 0.2 * u[:, _NUC_R]) if kind == _MIMIC else np.zeros(m)
    half = int(math.ceil(float((a + pair).max()) / mpp + 1.5))
    steps = np.arange(2 * half + 1)
    ox = np.floor(nuclei.x).astype(np.int64) - half
    oy = np.floor(nuclei.y).astype(np.int64) - half
    dx = (ox[:, None] + steps[None, :] + 0.5 - nuclei.x[:, None]).astype(np.float32)[:, None, :]
    dy = (oy[:, None] + steps[None, :] + 0.5 - nuclei.y[:, None]).astype(np.float32)[:, :, None]
    sub = max(1, math.ceil(mpp / REFERENCE_MPP - 1e-9))  # samples per pixel side
    pitch = mpp / sub  # um between samples
    offsets = ((np.arange(sub) + 0.5) / sub - 0.5).astype(np.float32)
    ux = (dx[..., None] + offsets).reshape(m, 1, -1) * np.float32(mpp)  # um from the point, per sample
    uy = (dy[:, :, 0, None] + offsets).reshape(m, -1, 1) * np.float32(mpp)
    cos_t, sin_t = _col(np.cos(angle)), _col(np.sin(angle))
    ink_px = 1.0 / mpp**2  # px per um^2

    def pixels(samples: np.ndarray) -> np.ndarray:
        """Per-pixel means of the samples."""
        win = len(steps)
        return samples.reshape(m, win, sub, win, sub).mean(axis=(2, 4)) if sub > 1 else samples

    if kind == _MIMIC:
        inside = np.zeros((m, ux.shape[2], ux.shape[2]), dtype=np.float32)
        for sign in (-1.0, 1.0):
            ex, ey = ux - sign * _col(pair) * cos_t, uy - sign * _col(pair) * sin_t
            inside += np.clip((_col(a) - np.sqrt(ex * ex + ey * ey)) / pitch + 0.5, 0.0, 1.0)
        return NucleusWindows(ox, oy, dx, dy, _unit(pixels(inside)), look.ink * spread * ink_px)

    along = (ux * cos_t + uy * sin_t) / _col(a)
    across = (uy * cos_t - ux * sin_t) / _col(b)
    rho = np.sqrt(along**2 + across**2)
    outline = np.ones_like(rho)
    if kind == _TUMOUR:  # irregular outline: r(t) = 1 + h3 cos(3t - p3) + h4 cos(4t - p4)
        c = along / np.maximum(rho, 1e-6)
        s = across / np.maximum(rho, 1e-6)
        harmonics = (
            (0.10 * u[:, _H3], 2 * math.pi * u[:, _P3], c * (4 * c * c - 3), s * (3 - 4 * s * s)),
            (
                0.07 * u[:, _H4],
                2 * math.pi * u[:, _P4],
                8 * c**4 - 8 * c * c + 1,
                4 * s * c * (c * c - s * s),
            ),
        )
        for amp, phase, cos_k, sin_k in harmonics:
            outline += _col(amp) * (cos_k * _col(np.cos(phase)) + sin_k * _col(np.sin(phase)))
    q = rho / outline  # 1 on the outline
    radius = np.sqrt(a * b)
    inside = np.clip((1.0 - q) * _col(radius / pitch) + 0.5, 0.0, 1.0)
    if kind == _NORMAL:
        return NucleusWindows(ox, oy, dx, dy, _unit(pixels(inside)), 0.7 * math.pi * a * b * spread * ink_px)

    samples = np.arange(len(steps) * sub)
    granules = sample_texture(
        textures(pitch).chromatin,
        (oy[:, None, None] + tile_y) * sub + samples[None, :, None],
        (ox[:, None, None] + tile_x) * sub + samples[None, None, :],
    )
    rim = np.clip((q - 0.55) / 0.4, 0.0, 1.0)
    chromatin = inside * (0.3 + 0.7 * rim * rim * (3 - 2 * rim)) * (0.7 + 0.6 * granules)
    nuc_t = 2 * math.pi * u[:, _NUC_A]
    nuc_r = (0.1 + 0.25 * u[:, _NUC_R]) * radius
    dist = np.sqrt((ux - _col(nuc_r * np.cos(nuc_t))) ** 2 + (uy - _col(nuc_r * np.sin(nuc_t))) ** 2)
    nucleolus = inside * np.clip((_col(0.45 + 0.125 * u[:, _NUC_S]) - dist) / pitch + 0.5, 0.0, 1.0)
    profile = _unit(_unit(pixels(chromatin)) + look.nucleolus * _unit(pixels(nucleolus)))
    total = look.tumour_ink * spread * ink_px
    # The few nuclei whose granules or nucleolus would exceed ``max_ink`` are flattened towards a disc.
    flat = _unit(pixels(inside))
    peak, flat_peak = profile.max(axis=(1, 2)) * total, flat.max(axis=(1, 2)) * total
    mix = _col(np.clip((peak - look.max_ink) / np.maximum(peak - flat_peak, 1e-6), 0.0, 1.0))
    return NucleusWindows(ox, oy, dx, dy, (1.0 - mix) * profile + mix * flat, total)


def _spectra(w: NucleusWindows, size: int = 64) -> np.ndarray:
    """Fourier transforms ``(M, size, size)`` of the profiles, phase-referenced to the pattern points."""
    win = w.profile.shape[1]
    k = 2 * math.pi * np.fft.fftfreq(size)
    padded = np.zeros((len(w.profile), size, size))
    padded[:, :win, :win] = w.profile
    # window pixel j sits at dx[0] + j from the point
    phase = np.exp(-1j * (k[None, None, :] * w.dx[:, :, :1] + k[None, :, None] * w.dy[:, :1, :]))
    return np.fft.fft2(padded) * phase


def _structure_factor(look: Appearance, mpp: float, size: int = 64) -> np.ndarray:
    """Structure factor of the thinned point pattern on the ``size`` x ``size`` frequency grid of
    :func:`_spectra` at ``mpp``, radially averaged from the periodic pattern."""
    pattern = poisson_disc_pattern(look.spacing)
    bins = 1024
    bin_um = PATTERN_PERIOD / bins
    density, _, _ = np.histogram2d(pattern[:, 1], pattern[:, 0], bins=bins, range=[[0, PATTERN_PERIOD]] * 2)
    power = (np.abs(np.fft.fft2(density)) ** 2 / len(pattern)).ravel()
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(bins, d=bin_um), np.fft.fftfreq(bins, d=bin_um))).ravel()
    edges = np.linspace(0.0, 0.5 / bin_um, 129)  # cycles per um, up to the Nyquist frequency of the bins
    which = np.digitize(radius, edges) - 1
    ok = (which < 128) & (radius > 0)
    radial = np.bincount(which[ok], weights=power[ok], minlength=128) / np.maximum(
        np.bincount(which[ok], minlength=128), 1
    )
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size))) / mpp  # cycles per um
    structure = np.interp(f, 0.5 * (edges[1:] + edges[:-1]), radial)
    occupancy = look.suspicious_occupancy * 0.875  # mean of the nest modulation
    return 1.0 - occupancy + occupancy * structure


def fit_mimic_separation(look: Appearance, mpp: float = REFERENCE_MPP, count: int = 500) -> float:
    """Distance (um) between the two nuclei of a mimic point that makes mimic regions keep the tumour's
    local variance and gradient energy at :data:`FIT_BOX` um/px, for a slide rendered at ``mpp``.

    Fitted to the tumour without its ``low_mag_tumour_contrast``, so that the mimics do not depend on it.
    """
    return _fit_mimic_separation(replace(look, low_mag_tumour_contrast=0.0), mpp, count)


@lru_cache(maxsize=8)
def _fit_mimic_separation(look: Appearance, mpp: float, count: int) -> float:
    """:func:`fit_mimic_separation` (cached per appearance and mpp).

    A region's ink is a marked point pattern; its power spectrum per point is
    ``(1 + cv^2) E|P(k)|^2 + (S(k) - 1) |E P(k)|^2`` for unit-sum profiles ``P`` and the pattern's structure
    factor ``S``. A pixel at 4 um/px is a box average of ``B = 4 / mpp`` px, so its variance is the sum
    over frequencies of the spectrum times the box filter's ``|B(k)|^2``, and its gradient energy the same
    sum times ``4 - 2 cos(B kx) - 2 cos(B ky)``. The separation minimising the squared log-ratios of the two
    to the tumour's is found by grid search (the same random nuclei for every candidate).
    """
    rng = np.random.default_rng(5)
    box = FIT_BOX / mpp  # at most 20 px in MPP_RANGE: the 64-px periodic windows hold it
    size = 64
    k = 2 * math.pi * np.fft.fftfreq(size)
    sinc = np.sinc(box * k / (2 * math.pi))
    area = (sinc[None, :] * sinc[:, None]) ** 2
    weights = np.stack([area, area * (4.0 - 2.0 * np.cos(box * k)[None, :] - 2.0 * np.cos(box * k)[:, None])])
    structure = _structure_factor(look, mpp, size)
    side = texture_period(textures(mpp).chromatin)

    def stats(kind: int, separation: float, nuclei: Nuclei) -> np.ndarray:
        p = _spectra(_nucleus_windows(kind, nuclei, look, mpp, 0, 0, separation), size)
        power = (1.0 + look.ink_cv**2) * (np.abs(p) ** 2).mean(0) + (structure - 1.0) * np.abs(p.mean(0)) ** 2
        return (weights * power).sum(axis=(1, 2))

    def sample() -> Nuclei:
        centre = rng.uniform(0.0, side, (2, count))  # all over the textures
        return Nuclei(centre[0], centre[1], rng.random((count, _STREAMS)))

    target = stats(_TUMOUR, 0.0, sample())
    mimics = sample()
    errors = [float((np.log(stats(_MIMIC, s, mimics) / target) ** 2).sum()) for s in SEPARATIONS]
    return SEPARATIONS[int(np.argmin(errors))]


def _render_ink(
    kind: int, nuclei: Nuclei, look: Appearance, mpp: float, x0: int, y0: int, size: int, separation: float
) -> np.ndarray:
    """Ink canvas (``size`` x ``size``) of the nuclei of one class on the tile at ``(x0, y0)``.

    Each point's profile sums to its integrated ink over its window, so the ink does not depend on the
    shape nor on where the tile cuts it.
    """
    w = _nucleus_windows(kind, nuclei, look, mpp, x0, y0, separation)
    steps = np.arange(w.profile.shape[1])
    iy = w.oy[:, None, None] + steps[None, :, None]
    ix = w.ox[:, None, None] + steps[None, None, :]
    valid = (iy >= 0) & (iy < size) & (ix >= 0) & (ix < size) & (w.profile > 0)
    ink = w.profile * _col(w.total)
    canvas = np.bincount((iy * size + ix)[valid], weights=ink[valid], minlength=size * size)
    return canvas.reshape(size, size).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Tiles


def _bilinear(
    block: np.ndarray, ix: np.ndarray, fx: np.ndarray, iy: np.ndarray, fy: np.ndarray
) -> np.ndarray:
    """``(F, len(iy), len(ix))`` bilinear values of the node block ``(F, ny, nx)``: each pixel's node
    (relative to the block) and weight of the next node, per axis. Gathers and products rather than matrix
    products: with several threads, OpenBLAS takes milliseconds for such small matrices."""
    rows = block[:, :, ix] * (1.0 - fx) + block[:, :, ix + 1] * fx
    return rows[:, iy, :] * (1.0 - fy)[:, None] + rows[:, iy + 1, :] * fy[:, None]


class TileRenderer:
    """Renders level-0 tiles of one scene at ``mpp``: ``render(x0, y0)`` for the tile whose top-left corner is
    at px ``(x0, y0)``.

    Args:
        scene: the slide layout (um).
        mpp: um per level-0 px (in :data:`MPP_RANGE`).
        look: the cell-level appearance (um).
        border: width (px) of a black scanner border along the slide edges (0: none).
    """

    glass_variants = 8
    rough = 3.0  # amplitude (um) of the ragged tissue edge

    def __init__(self, scene: Scene, mpp: float, look: Appearance | None = None, border: int = 0) -> None:
        self.scene = scene
        self.mpp = check_mpp(mpp)
        self.width, self.height = scene.pixels(self.mpp)
        self.look = look or Appearance()
        self.border = int(border)
        self.tex = textures(self.mpp)
        self.pattern = poisson_disc_pattern(self.look.spacing) / self.mpp
        self.period = PATTERN_PERIOD / self.mpp
        self.separation = self.look.mimic_separation or fit_mimic_separation(self.look, self.mpp)
        self.margin = _max_extent(self.look) / self.mpp + 2.0
        self.seed_key = int(_splitmix(np.array([scene.seed], dtype=np.uint64))[0])
        tx, ty = scene.pattern_offset
        self.offset = ((tx % PATTERN_PERIOD) / self.mpp, (ty % PATTERN_PERIOD) / self.mpp)
        # whole um, so that the textures line up at any mpp that divides 1 um (0.25, 0.5, ...)
        side = texture_period(self.tex.chromatin)
        self.tex_offset = (round(int(tx) / self.mpp) % side, round(int(ty) / self.mpp) % side)
        s = scene.stain.astype(np.float32)  # this slide's staining: hematoxylin, eosin, colour shift
        stroma = STROMA + 4.0 * s[2:5]
        cytoplasm = CYTOPLASM + 4.0 * s[2:5]
        # A tile's colour is made of these (see render()): glass, stroma, cytoplasm minus stroma, eosin and
        # hematoxylin per unit of stain, pixel noise.
        self.colours = np.stack(
            [
                GLASS,
                stroma,
                cytoplasm - stroma,
                -EOSIN * (1.0 + 0.15 * s[1]),
                -HEMATOXYLIN * (1.0 + 0.08 * s[0]),
                np.full(3, self.look.noise, dtype=np.float32),
            ]
        ).astype(np.float32)
        self._interps: dict[tuple[int, int, int], tuple[int, int, np.ndarray, np.ndarray]] = {}
        self._glass: dict[tuple[int, int], np.ndarray] = {}

    # -- fields ------------------------------------------------------------------------------------------
    def _interp(self, start: int, size: int, nodes: int) -> tuple[int, int, np.ndarray, np.ndarray]:
        """Bilinear interpolation of ``nodes`` grid nodes to pixel centres ``start .. start + size``: first
        node, number of nodes, each pixel's node (relative to the first) and weight of the next node.
        Pixels past the grid (the padding of the last tiles) take its last node."""
        key = (start, size, nodes)
        if key not in self._interps:
            g = (np.arange(start, start + size) + 0.5) * self.mpp / self.scene.step
            g = np.clip(g, 0.0, nodes - 1.000001)
            i = np.floor(g).astype(np.int64)
            i0 = int(i[0])
            if len(self._interps) > 4096:
                self._interps.clear()
            self._interps[key] = (i0, int(i[-1]) - i0 + 2, i - i0, (g - i).astype(np.float32))
        return self._interps[key]

    def fields(self, x0: int, y0: int, size: int) -> np.ndarray:
        """Signed distance to the tissue (um) and stain tone interpolated on the tile at ``(x0, y0)``:
        ``(2, size, size)``."""
        grid = self.scene.fields
        jx, nx, ix, fx = self._interp(x0, size, grid.shape[2])
        jy, ny, iy, fy = self._interp(y0, size, grid.shape[1])
        return _bilinear(grid[:, jy : jy + ny, jx : jx + nx], ix, fx, iy, fy)

    def _box(self, x0: int, y0: int, size: int) -> tuple[float, float, float, float]:
        """The tile at ``(x0, y0)`` as a box in um."""
        return x0 * self.mpp, y0 * self.mpp, (x0 + size) * self.mpp, (y0 + size) * self.mpp

    def _lattice(
        self, x0: int, y0: int, size: int, distances: list[Callable[[np.ndarray, np.ndarray], np.ndarray]]
    ) -> np.ndarray:
        """Signed distances (um) on the lattice of the tile at ``(x0, y0)``: every :data:`LATTICE` px,
        corners included, ``(len(distances), size / LATTICE + 1, size / LATTICE + 1)``."""
        nodes = np.arange(0, size + LATTICE, LATTICE)
        x, y = np.meshgrid((x0 + nodes) * self.mpp, (y0 + nodes) * self.mpp)
        return np.stack([distance(x, y) for distance in distances]).astype(np.float32)

    @staticmethod
    def _from_lattice(block: np.ndarray, size: int) -> np.ndarray:
        """Lattice values interpolated bilinearly on the tile's pixels: a smooth distance loses nothing to
        it, and a tile costs a few hundred evaluations instead of ``size**2``."""
        g = (np.arange(size) + 0.5) / LATTICE
        i = g.astype(np.int64)
        f = (g - i).astype(np.float32)
        return _bilinear(block, i, f, i, f)

    def region_fields(self, x0: int, y0: int, size: int) -> np.ndarray | None:
        """Signed distances (um) to the tumour and the mimic regions on the tile at ``(x0, y0)``:
        ``(2, size, size)``; ``None`` when no region comes within half the edge ramp of the tile."""
        if not self.scene.regions_near(self._box(x0, y0, size)):
            return None
        distances = [functools.partial(self.scene.region_distance, kind) for kind in (TUMOUR, MIMIC)]
        block = self._lattice(x0, y0, size, distances)
        return None if block.max() < -self.look.edge / 2 else self._from_lattice(block, size)

    def has_tissue(self, x0: int, y0: int, size: int) -> bool:
        """Whether the tile may show tissue (bilinear values never exceed the nodes around them)."""
        grid = self.scene.fields
        jx, nx, _, _ = self._interp(x0, size, grid.shape[2])
        jy, ny, _, _ = self._interp(y0, size, grid.shape[1])
        reach = 4.0 * self.rough + 2.0 * self.mpp
        return bool(grid[FIELD_TISSUE, jy : jy + ny, jx : jx + nx].max() >= -reach)

    # -- nuclei ------------------------------------------------------------------------------------------
    def nuclei(self, x0: int, y0: int, size: int) -> dict[int, Nuclei]:
        """Occupied pattern points near a tile, by class, with their marks."""
        ox, oy = self.offset
        m, period, pat = self.margin, self.period, self.pattern
        xs, ys, keys = [], [], []

        def copies(start: int, shift: float) -> range:
            lo = math.floor((start - m - shift) / period)
            return range(lo, math.floor((start + size + m - shift) / period) + 1)

        for cy in copies(y0, oy):
            for cx in copies(x0, ox):
                px = pat[:, 0] + cx * period + ox
                py = pat[:, 1] + cy * period + oy
                sel = np.flatnonzero(
                    (px >= x0 - m) & (px < x0 + size + m) & (py >= y0 - m) & (py < y0 + size + m)
                )
                xs.append(px[sel])
                ys.append(py[sel])
                copy = ((cy + 4096) << 13) | (cx + 4096)
                keys.append((np.uint64(copy) << np.uint64(20)) | sel.astype(np.uint64))
        x, y = np.concatenate(xs), np.concatenate(ys)
        if len(x) == 0:
            return {}
        point_keys = np.concatenate(keys) ^ np.uint64(self.seed_key)
        u = hash_uniform(point_keys, _STREAMS)
        scene, look, mpp = self.scene, self.look, self.mpp
        tissue = scene.sample(FIELD_TISSUE, x * mpp, y * mpp)
        tumour = scene.region_distance(TUMOUR, x * mpp, y * mpp)
        mimic = scene.region_distance(MIMIC, x * mpp, y * mpp)
        depth = np.maximum(tumour, mimic)
        nest = sample_texture(self.tex.nest, y + self.tex_offset[1], x + self.tex_offset[0])
        dense = look.suspicious_occupancy * (0.75 + 0.25 * nest)
        ramp = np.clip(depth / look.edge, 0.0, 1.0)
        occupancy = np.where(
            depth > 0, look.normal_occupancy + (dense - look.normal_occupancy) * ramp, look.normal_occupancy
        )
        keep = (tissue > m * mpp) & (u[:, _OCCUPY] < occupancy)
        kind = np.where(tumour > 0, _TUMOUR, np.where(mimic > 0, _MIMIC, _NORMAL))
        graded = np.flatnonzero(keep & (tumour > 0))
        if len(graded):  # a region of grade g: tumour nuclei at a share (g + 1) / C of its points
            share = (scene.region_grade(x[graded] * mpp, y[graded] * mpp) + 1) / scene.num_classes
            mixed = hash_uniform(point_keys[graded] ^ _GRADE_KEY, 1)[:, 0] >= share
            kind[graded[mixed]] = _MIMIC
        out = {}
        for k in (_NORMAL, _MIMIC, _TUMOUR):
            sel = keep & (kind == k)
            if sel.any():
                out[k] = Nuclei(x[sel] - x0, y[sel] - y0, u[sel])
        return out

    # -- tiles -------------------------------------------------------------------------------------------
    def _border_mask(self, x0: int, y0: int, size: int) -> np.ndarray | None:
        """Pixels of the tile in the scanner border, or ``None`` if it has none."""
        b, w, h = self.border, self.width, self.height
        if b <= 0 or (b <= x0 and x0 + size <= w - b and b <= y0 and y0 + size <= h - b):
            return None
        x = np.arange(x0, x0 + size)
        y = np.arange(y0, y0 + size)
        return ((x < b) | (x >= w - b))[None, :] | ((y < b) | (y >= h - b))[:, None]

    def _absorption(self, marks: list[Mark], x0: int, y0: int, size: int) -> np.ndarray:
        """``(size, size, 3)`` fraction of the light that the marks on the glass let through (each mark's
        edge anti-aliased over one pixel)."""
        inside = self._from_lattice(self._lattice(x0, y0, size, [m.signed_distance for m in marks]), size)
        out = np.ones((size, size, 3), dtype=np.float32)
        for mark, distance in zip(marks, inside, strict=True):
            alpha = mark.opacity * np.clip(distance / self.mpp + 0.5, 0.0, 1.0)[..., None]
            out *= 1.0 - alpha * (1.0 - np.asarray(mark.transmittance, dtype=np.float32))
        return out

    def glass(self, x0: int, y0: int, size: int = TILE) -> tuple[np.ndarray, int]:
        """Background tile (glass colour with pixel noise): one of a few fixed variants, picked by a hash
        of the tile position so that the noise does not repeat in a regular way. Returns it (read-only) and
        its variant index."""
        key = np.array([(x0 // TILE) * 1_000_003 + (y0 // TILE)], dtype=np.uint64) ^ np.uint64(self.seed_key)
        variant = int(hash_uniform(key, 1)[0, 0] * self.glass_variants)
        if (variant, size) not in self._glass:
            noise = texture_block(self.tex.pixel, 97 * variant, 389 * variant, size)
            tile = np.clip(GLASS + self.look.noise * noise[..., None] + 0.5, 0, 255).astype(np.uint8)
            tile.flags.writeable = False
            self._glass[variant, size] = tile
        return self._glass[variant, size], variant

    def render(self, x0: int, y0: int, size: int = TILE) -> tuple[np.ndarray, int | None]:
        """The ``size`` x ``size`` level-0 tile at ``(x0, y0)`` as uint8 RGB.

        Returns:
            The tile, and the glass variant index if the tile is plain background (then the tile is shared
            and read-only, and callers may cache what they derive from it), else ``None``.
        """
        border = self._border_mask(x0, y0, size)
        mpp = self.mpp
        marks = self.scene.marks_in(self._box(x0, y0, size))
        absorption = self._absorption(marks, x0, y0, size) if marks else None
        if not self.has_tissue(x0, y0, size):
            tile, variant = self.glass(x0, y0, size)
            if border is None and absorption is None:
                return tile, variant
            if absorption is None:
                tile = tile.copy()
            else:
                tile = np.clip(tile * absorption + 0.5, 0, 255).astype(np.uint8)
            if border is not None:
                tile[border] = BORDER.astype(np.uint8)
            return tile, None

        look = self.look
        tissue_sd, tone = self.fields(x0, y0, size)
        regions = self.region_fields(x0, y0, size)
        tx, ty = x0 + self.tex_offset[0], y0 + self.tex_offset[1]
        rough = self.rough * texture_block(self.tex.rough, ty, tx, size)
        alpha = np.clip(0.5 + (tissue_sd + rough) / mpp, 0.0, 1.0)
        fibre = texture_block(self.tex.fibre, ty, tx, size)
        if regions is None:  # no cells of a suspicious region on this tile
            cellular = None
            eosin = (look.tone * tone + 1.0) * (0.4 + 0.6 * fibre)
        else:
            cellular = np.clip(regions.max(axis=0) / look.edge + 0.5, 0.0, 1.0)
            eosin = (look.tone * tone + 1.0) * ((0.4 + 0.6 * fibre) - (0.15 + 0.3 * fibre) * cellular)
        ink = np.zeros((size, size), dtype=np.float32)
        for kind, group in self.nuclei(x0, y0, size).items():
            ink += _render_ink(kind, group, look, mpp, x0, y0, size, self.separation)
        noise = texture_block(self.tex.pixel, ty + 511, tx + 257, size)
        # glass + alpha * (stroma - glass + cellular * (cytoplasm - stroma) + eosin * E + ink * H) + noise
        glass, stroma, cytoplasm, eosin_colour, ink_colour, noise_colour = self.colours
        tile = np.empty((size, size, 3), dtype=np.uint8)
        for c in range(3):
            channel = eosin * eosin_colour[c]
            channel += ink * ink_colour[c]
            if cellular is not None:
                channel += cellular * cytoplasm[c]
            channel += stroma[c] - glass[c]
            channel *= alpha
            channel += noise * noise_colour[c]
            channel += glass[c] + 0.5
            if absorption is not None:
                channel *= absorption[..., c]
            tile[..., c] = np.clip(channel, 0, 255, out=channel)
        if border is not None:
            tile[border] = BORDER.astype(np.uint8)
        return tile, None
