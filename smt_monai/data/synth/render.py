"""Level-0 tiles of a synthetic slide, rendered one at a time from the :class:`~.scene.Scene`.

A tile depends only on its position, so a slide of any size streams with constant memory:

- Smooth things (tissue outline, region outlines, stain tone) are bilinear interpolations of the scene's
  low-resolution fields.
- Nuclei sit on a fixed periodic Poisson-disc pattern (minimum centre distance ``spacing``). Every pattern
  point gets its random marks (is it occupied, size, shape, ink, ...) from a hash of its absolute position
  and the slide seed, so a nucleus that straddles two tiles is drawn identically in both.
- Fine textures (pixel noise, chromatin granules, stroma fibres, ragged tissue edges) are read from
  periodic noise images at absolute coordinates.

The task SMT is for, suspicious at low magnification and decidable only at high magnification, shapes the
nuclei. Tumour and mimic regions share the point pattern, the occupancy, the cytoplasm and the ink colour,
and what is drawn at each pattern point carries the same integrated ink (darkness times area), from the same
distribution; a pyramid level at downsample 16 or more, an area average, then shows both with the same mean
colour. Their difference is inside the nuclei: a tumour point holds one large, pleomorphic (size,
elongation, irregular outline), vesicular nucleus (pale, with a granular rim and a nucleolus); a mimic point
two small, round, uniform, dark lymphoid nuclei. Three leaks that a prototype of such data showed are
closed here, and ``tests/test_synth.py`` checks that a classifier on colour and texture statistics stays
near chance at downsample 16 and 64 while it separates the two at level 0:

- clipping: a pixel darker than black loses ink, so dark, overlapping or granular nuclei come out lighter
  when averaged (the mimic's green channel did). Ink per pixel is capped (``max_ink``) below saturation.
- blur: a large pale nucleus loses more contrast to area averaging than a small dark one, so the local
  variance at downsample 16 gave tumour away. The distance between the two mimic nuclei is fitted
  (:func:`fit_mimic_separation`) so that both classes keep the same variance and gradient energy there.
- colour: a nucleolus in a colour of its own blurs differently from the rest of the nucleus, so channel
  ratios of the local variance gave tumour away. All nuclear ink has one colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from smt_monai.data.synth.scene import FIELD_MIMIC, FIELD_TISSUE, FIELD_TONE, FIELD_TUMOUR, Scene

TILE = 256
TEXTURE = 1024
PATTERN_PERIOD = 2048

# Colours (0-255), and intensity removed per unit of stain.
GLASS = np.array([242.0, 241.0, 240.0], dtype=np.float32)
STROMA = np.array([240.0, 178.0, 208.0], dtype=np.float32)
CYTOPLASM = np.array([214.0, 168.0, 210.0], dtype=np.float32)
HEMATOXYLIN = np.array([128.0, 130.0, 70.0], dtype=np.float32)
EOSIN = np.array([6.0, 42.0, 18.0], dtype=np.float32)
BORDER = np.array([18.0, 18.0, 18.0], dtype=np.float32)


@dataclass(frozen=True)
class Appearance:
    """Cell-level look of a synthetic slide (level-0 px). See the module docstring for the reasoning.

    Args:
        spacing: minimum distance between pattern points (nucleus centres, or mimic nucleus-pair centres).
        normal_occupancy: fraction of pattern points holding a stroma nucleus in normal tissue.
        suspicious_occupancy: the same inside tumour and mimic regions (scaled by a smooth "nest" texture).
        mimic_radius: mean radius of each of the two lymphoid nuclei at a mimic point.
        tumour_radius: range of tumour nucleus radii.
        ink: mean integrated ink (ink x px) at a tumour or mimic point; one unit of ink on a pixel removes
            :data:`HEMATOXYLIN` from its colour.
        ink_cv: coefficient of variation of a point's integrated ink (the same for tumour and mimic).
        max_ink: most ink on one pixel of a tumour nucleus, so that no pixel saturates.
        nucleolus: ink of a tumour nucleolus relative to the rest of its nucleus.
        edge: width (px) over which cell density rises inside a suspicious region's outline.
        noise: standard deviation of the pixel noise (intensity levels).
        tone: relative amplitude of the smooth variation of eosin staining across the slide.
        mimic_separation: distance (px) between the two nuclei of a mimic point; ``None``: fitted to the
            other parameters by :func:`fit_mimic_separation` (which takes a couple of seconds).
    """

    spacing: float = 16.0
    normal_occupancy: float = 0.06
    suspicious_occupancy: float = 0.9
    mimic_radius: float = 2.8
    tumour_radius: tuple[float, float] = (4.2, 6.2)
    ink: float = 26.0
    ink_cv: float = 0.15
    max_ink: float = 0.8
    nucleolus: float = 0.15
    edge: float = 24.0
    noise: float = 1.5
    tone: float = 0.5
    mimic_separation: float | None = None


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


@dataclass(frozen=True)
class Textures:
    """Periodic ``TEXTURE`` x ``TEXTURE`` noise images shared by all slides (fixed seed)."""

    pixel: np.ndarray  # white noise, standard normal
    chromatin: np.ndarray  # granules about 1 px, uniform in [0, 1]
    fibre: np.ndarray  # stroma fibres: crossing streaks, uniform in [0, 1]
    rough: np.ndarray  # ragged tissue edges, about 12 px, standard normal
    nest: np.ndarray  # cell-density variation inside regions, about 40 px, uniform in [0, 1]


@lru_cache(maxsize=1)
def textures() -> Textures:
    """The shared textures, made once per process."""
    rng = np.random.default_rng(20240601)
    shape = (TEXTURE, TEXTURE)

    def noise() -> np.ndarray:
        return rng.standard_normal(shape)

    fibre = _periodic_blur(noise(), (14.0, 1.2), 0.5) + _periodic_blur(noise(), (14.0, 1.2), 2.2)
    return Textures(
        pixel=noise().astype(np.float32),
        chromatin=_to_unit(_periodic_blur(noise(), (0.9, 0.9))),
        fibre=_to_unit(fibre),
        rough=_periodic_blur(noise(), (12.0, 12.0)).astype(np.float32),
        nest=_to_unit(_periodic_blur(noise(), (40.0, 40.0))),
    )


def sample_texture(texture: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Texture values at integer pixel coordinates (any shape), wrapping around."""
    return texture[np.asarray(y, dtype=np.int64) % TEXTURE, np.asarray(x, dtype=np.int64) % TEXTURE]


def texture_block(texture: np.ndarray, y0: int, x0: int, size: int = TILE) -> np.ndarray:
    """A ``size`` x ``size`` block (read-only view when possible) of a texture at absolute pixel
    ``(x0, y0)``, wrapping around."""
    y0, x0 = y0 % TEXTURE, x0 % TEXTURE
    if y0 + size <= TEXTURE and x0 + size <= TEXTURE:
        return texture[y0 : y0 + size, x0 : x0 + size]
    return texture[np.ix_(np.arange(y0, y0 + size) % TEXTURE, np.arange(x0, x0 + size) % TEXTURE)]


@lru_cache(maxsize=4)
def poisson_disc_pattern(spacing: float, period: int = PATTERN_PERIOD, seed: int = 7) -> np.ndarray:
    """Points in a periodic ``period`` x ``period`` square, no two closer than ``spacing`` (with wrap-around).

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
_NORMAL, _MIMIC, _TUMOUR = 0, 1, 2
SEPARATIONS = tuple(float(s) for s in np.arange(4.0, 10.01, 0.25))  # candidate mimic nucleus-pair distances


@dataclass
class Nuclei:
    """Occupied pattern points of one class near a tile: centres in tile coordinates and random marks."""

    x: np.ndarray
    y: np.ndarray
    u: np.ndarray  # (M, _STREAMS) uniforms


@dataclass
class NucleusWindows:
    """What is drawn at each point, on its own square window: window origins (tile coordinates), pixel
    offsets from the point, the ink profile (summing to 1 over the window) and the integrated ink."""

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
    """Largest distance from a pattern point to the edge of the ink drawn there, any class."""
    tumour = look.tumour_radius[1] * math.sqrt(1.35) * 1.17
    mimic = 0.55 * SEPARATIONS[-1] + 1.05 * look.mimic_radius
    return max(9.0, tumour, mimic) + 1.0


def _nucleus_windows(
    kind: int, nuclei: Nuclei, look: Appearance, tile_x: int, tile_y: int, separation: float
) -> NucleusWindows:
    """Draw what sits at each pattern point of one class on its own window.

    Tumour: one large pleomorphic nucleus, ink concentrated in granules along its rim, and a nucleolus.
    Mimic: two small round dark nuclei about ``separation`` px apart (lymphoid tissue: smaller and more
    numerous nuclei). Normal: one spindle-shaped stroma nucleus.
    """
    u = nuclei.u
    m = len(u)
    angle = u[:, _ORIENT] * math.pi
    spread = 1.0 + look.ink_cv * math.sqrt(3.0) * (2.0 * u[:, _INK] - 1.0)
    if kind == _NORMAL:
        a, b = 6.0 + 3.0 * u[:, _SIZE], 1.8 + 0.6 * u[:, _ELONG]
    elif kind == _MIMIC:
        a = b = look.mimic_radius * (0.95 + 0.1 * u[:, _SIZE])
    else:
        r = look.tumour_radius[0] + (look.tumour_radius[1] - look.tumour_radius[0]) * u[:, _SIZE]
        e = 1.0 + 0.35 * u[:, _ELONG]
        a, b = r * np.sqrt(e), r / np.sqrt(e)
    pair = 0.5 * separation * (0.9 + 0.2 * u[:, _NUC_R]) if kind == _MIMIC else np.zeros(m)
    half = int(math.ceil(float((a + pair).max()) + 1.5))
    steps = np.arange(2 * half + 1)
    ox = np.floor(nuclei.x).astype(np.int64) - half
    oy = np.floor(nuclei.y).astype(np.int64) - half
    dx = (ox[:, None] + steps[None, :] + 0.5 - nuclei.x[:, None]).astype(np.float32)[:, None, :]
    dy = (oy[:, None] + steps[None, :] + 0.5 - nuclei.y[:, None]).astype(np.float32)[:, :, None]
    cos_t, sin_t = _col(np.cos(angle)), _col(np.sin(angle))

    if kind == _MIMIC:
        inside = np.zeros((m, len(steps), len(steps)), dtype=np.float32)
        for sign in (-1.0, 1.0):
            ex, ey = dx - sign * _col(pair) * cos_t, dy - sign * _col(pair) * sin_t
            inside += np.clip(_col(a) + 0.5 - np.sqrt(ex * ex + ey * ey), 0.0, 1.0)
        return NucleusWindows(ox, oy, dx, dy, _unit(inside), look.ink * spread)

    along = (dx * cos_t + dy * sin_t) / _col(a)
    across = (dy * cos_t - dx * sin_t) / _col(b)
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
    inside = np.clip((1.0 - q) * _col(radius) + 0.5, 0.0, 1.0)
    if kind == _NORMAL:
        return NucleusWindows(ox, oy, dx, dy, _unit(inside), 0.7 * math.pi * a * b * spread)

    granules = sample_texture(
        textures().chromatin,
        oy[:, None, None] + steps[None, :, None] + tile_y,
        ox[:, None, None] + steps[None, None, :] + tile_x,
    )
    rim = np.clip((q - 0.55) / 0.4, 0.0, 1.0)
    chromatin = inside * (0.3 + 0.7 * rim * rim * (3 - 2 * rim)) * (0.7 + 0.6 * granules)
    nuc_t = 2 * math.pi * u[:, _NUC_A]
    nuc_r = (0.1 + 0.25 * u[:, _NUC_R]) * radius
    dist = np.sqrt((dx - _col(nuc_r * np.cos(nuc_t))) ** 2 + (dy - _col(nuc_r * np.sin(nuc_t))) ** 2)
    nucleolus = inside * np.clip(_col(1.8 + 0.5 * u[:, _NUC_S]) - dist, 0.0, 1.0)
    profile = _unit(_unit(chromatin) + look.nucleolus * _unit(nucleolus))
    total = look.ink * spread
    # The few nuclei whose granules or nucleolus would exceed ``max_ink`` are flattened towards a disc.
    flat = _unit(inside)
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


def _structure_factor(look: Appearance, size: int = 64) -> np.ndarray:
    """Structure factor of the thinned point pattern on the ``size`` x ``size`` frequency grid of
    :func:`_spectra`, radially averaged from the periodic pattern."""
    pattern = poisson_disc_pattern(look.spacing)
    bins = PATTERN_PERIOD // 2
    density, _, _ = np.histogram2d(pattern[:, 1], pattern[:, 0], bins=bins, range=[[0, PATTERN_PERIOD]] * 2)
    power = (np.abs(np.fft.fft2(density)) ** 2 / len(pattern)).ravel()
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(bins, d=2.0), np.fft.fftfreq(bins, d=2.0))).ravel()
    edges = np.linspace(0.0, 0.25, 129)  # cycles per px, up to the Nyquist frequency of the 2-px bins
    which = np.digitize(radius, edges) - 1
    ok = (which < 128) & (radius > 0)
    radial = np.bincount(which[ok], weights=power[ok], minlength=128) / np.maximum(
        np.bincount(which[ok], minlength=128), 1
    )
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size)))
    structure = np.interp(f, 0.5 * (edges[1:] + edges[:-1]), radial)
    occupancy = look.suspicious_occupancy * 0.875  # mean of the nest modulation
    return 1.0 - occupancy + occupancy * structure


@lru_cache(maxsize=4)
def fit_mimic_separation(look: Appearance, count: int = 500) -> float:
    """Distance between the two nuclei of a mimic point that makes mimic regions keep the tumour's local
    variance and gradient energy at downsample 16.

    A region's ink is a marked point pattern; its power spectrum per point is
    ``(1 + cv^2) E|P(k)|^2 + (S(k) - 1) |E P(k)|^2`` for unit-sum profiles ``P`` and the pattern's structure
    factor ``S``. A pixel at downsample 16 is a 16 x 16 box average, so its variance is the sum over
    frequencies of the spectrum times the box filter's ``|B16(k)|^2``, and its gradient energy the same sum
    times ``4 - 2 cos(16 kx) - 2 cos(16 ky)``. The separation minimising the squared log-ratios of the two
    to the tumour's is found by grid search (the same random nuclei for every candidate).
    """
    rng = np.random.default_rng(5)
    size = 64
    k = 2 * math.pi * np.fft.fftfreq(size)
    box = (np.sinc(16 * k / (2 * math.pi))[None, :] * np.sinc(16 * k / (2 * math.pi))[:, None]) ** 2
    weights = np.stack([box, box * (4.0 - 2.0 * np.cos(16 * k)[None, :] - 2.0 * np.cos(16 * k)[:, None])])
    structure = _structure_factor(look, size)

    def stats(kind: int, separation: float, nuclei: Nuclei) -> np.ndarray:
        p = _spectra(_nucleus_windows(kind, nuclei, look, 0, 0, separation), size)
        power = (1.0 + look.ink_cv**2) * (np.abs(p) ** 2).mean(0) + (structure - 1.0) * np.abs(p.mean(0)) ** 2
        return (weights * power).sum(axis=(1, 2))

    def sample() -> Nuclei:
        centre = rng.uniform(0.0, TEXTURE, (2, count))  # all over the textures
        return Nuclei(centre[0], centre[1], rng.random((count, _STREAMS)))

    target = stats(_TUMOUR, 0.0, sample())
    mimics = sample()
    errors = [float((np.log(stats(_MIMIC, s, mimics) / target) ** 2).sum()) for s in SEPARATIONS]
    return SEPARATIONS[int(np.argmin(errors))]


def _render_ink(
    kind: int, nuclei: Nuclei, look: Appearance, x0: int, y0: int, size: int, separation: float
) -> np.ndarray:
    """Ink canvas (``size`` x ``size``) of the nuclei of one class on the tile at ``(x0, y0)``.

    Each point's profile sums to its integrated ink over its window, so the ink does not depend on the
    shape nor on where the tile cuts it.
    """
    w = _nucleus_windows(kind, nuclei, look, x0, y0, separation)
    steps = np.arange(w.profile.shape[1])
    iy = w.oy[:, None, None] + steps[None, :, None]
    ix = w.ox[:, None, None] + steps[None, None, :]
    valid = (iy >= 0) & (iy < size) & (ix >= 0) & (ix < size) & (w.profile > 0)
    ink = w.profile * _col(w.total)
    canvas = np.bincount((iy * size + ix)[valid], weights=ink[valid], minlength=size * size)
    return canvas.reshape(size, size).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Tiles


class TileRenderer:
    """Renders level-0 tiles of one scene: ``render(x0, y0)`` for the tile whose top-left corner is there.

    Args:
        scene: the slide layout.
        look: the cell-level appearance.
        border: width (px) of a black scanner border along the slide edges (0: none).
    """

    glass_variants = 8
    rough = 12.0  # amplitude (px) of the ragged tissue edge

    def __init__(self, scene: Scene, look: Appearance | None = None, border: int = 0) -> None:
        self.scene = scene
        self.look = look or Appearance()
        self.border = int(border)
        self.tex = textures()
        self.pattern = poisson_disc_pattern(self.look.spacing)
        self.separation = self.look.mimic_separation or fit_mimic_separation(self.look)
        self.margin = _max_extent(self.look) + 2.0
        self.seed_key = int(_splitmix(np.array([scene.seed], dtype=np.uint64))[0])
        tx, ty = scene.pattern_offset
        self.offset = (tx % PATTERN_PERIOD, ty % PATTERN_PERIOD)
        self.tex_offset = (int(tx) % TEXTURE, int(ty) % TEXTURE)
        s = scene.stain.astype(np.float32)  # this slide's staining: hematoxylin, eosin, colour shift
        stroma = STROMA + 4.0 * s[2:5]
        cytoplasm = CYTOPLASM + 4.0 * s[2:5]
        # A tile's colour is the sum of six planes (see render()) times these colours.
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
        self._interps: dict[tuple[int, int], tuple[int, int, np.ndarray, np.ndarray]] = {}
        self._glass: dict[tuple[int, int], np.ndarray] = {}

    # -- fields ------------------------------------------------------------------------------------------
    def _interp(self, start: int, size: int) -> tuple[int, int, np.ndarray, np.ndarray]:
        """Bilinear interpolation of grid nodes to pixel centres ``start .. start + size``: first node,
        number of nodes, each pixel's node (relative to the first) and weight of the next node."""
        key = (start, size)
        if key not in self._interps:
            g = (np.arange(start, start + size) + 0.5) / self.scene.step
            i0 = int(math.floor(g[0]))
            i = np.floor(g).astype(np.int64)
            if len(self._interps) > 4096:
                self._interps.clear()
            self._interps[key] = (i0, int(i[-1]) - i0 + 2, i - i0, (g - i).astype(np.float32))
        return self._interps[key]

    def fields(self, x0: int, y0: int, size: int, which: list[int]) -> np.ndarray:
        """Fields ``which`` interpolated on the tile at ``(x0, y0)``: ``(len(which), size, size)``.

        Written as gathers and products rather than matrix products: with several threads, OpenBLAS takes
        milliseconds for such small matrices.
        """
        jx, nx, ix, fx = self._interp(x0, size)
        jy, ny, iy, fy = self._interp(y0, size)
        block = self.scene.fields[which, jy : jy + ny, jx : jx + nx]
        rows = block[:, :, ix] * (1.0 - fx) + block[:, :, ix + 1] * fx
        return rows[:, iy, :] * (1.0 - fy)[:, None] + rows[:, iy + 1, :] * fy[:, None]

    def has_tissue(self, x0: int, y0: int, size: int) -> bool:
        """Whether the tile may show tissue (bilinear values never exceed the nodes around them)."""
        jx, nx, _, _ = self._interp(x0, size)
        jy, ny, _, _ = self._interp(y0, size)
        return bool(
            self.scene.fields[FIELD_TISSUE, jy : jy + ny, jx : jx + nx].max() >= -(4.0 * self.rough + 2.0)
        )

    # -- nuclei ------------------------------------------------------------------------------------------
    def nuclei(self, x0: int, y0: int, size: int) -> dict[int, Nuclei]:
        """Occupied pattern points near a tile, by class, with their marks."""
        ox, oy = self.offset
        m = self.margin
        xs, ys, keys = [], [], []
        pat = self.pattern

        def copies(start: int, shift: float) -> range:
            lo = math.floor((start - m - shift) / PATTERN_PERIOD)
            return range(lo, math.floor((start + size + m - shift) / PATTERN_PERIOD) + 1)

        for cy in copies(y0, oy):
            for cx in copies(x0, ox):
                px = pat[:, 0] + cx * PATTERN_PERIOD + ox
                py = pat[:, 1] + cy * PATTERN_PERIOD + oy
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
        u = hash_uniform(np.concatenate(keys) ^ np.uint64(self.seed_key), _STREAMS)
        scene, look = self.scene, self.look
        tissue = scene.sample(FIELD_TISSUE, x, y)
        tumour = scene.sample(FIELD_TUMOUR, x, y)
        mimic = scene.sample(FIELD_MIMIC, x, y)
        depth = np.maximum(tumour, mimic)
        nest = sample_texture(self.tex.nest, y + self.tex_offset[1], x + self.tex_offset[0])
        dense = look.suspicious_occupancy * (0.75 + 0.25 * nest)
        ramp = np.clip(depth / look.edge, 0.0, 1.0)
        occupancy = np.where(
            depth > 0, look.normal_occupancy + (dense - look.normal_occupancy) * ramp, look.normal_occupancy
        )
        keep = (tissue > self.margin) & (u[:, _OCCUPY] < occupancy)
        kind = np.where(tumour > 0, _TUMOUR, np.where(mimic > 0, _MIMIC, _NORMAL))
        out = {}
        for k in (_NORMAL, _MIMIC, _TUMOUR):
            sel = keep & (kind == k)
            if sel.any():
                out[k] = Nuclei(x[sel] - x0, y[sel] - y0, u[sel])
        return out

    # -- tiles -------------------------------------------------------------------------------------------
    def _border_mask(self, x0: int, y0: int, size: int) -> np.ndarray | None:
        """Pixels of the tile in the scanner border, or ``None`` if it has none."""
        b, w, h = self.border, self.scene.width, self.scene.height
        if b <= 0 or (b <= x0 and x0 + size <= w - b and b <= y0 and y0 + size <= h - b):
            return None
        x = np.arange(x0, x0 + size)
        y = np.arange(y0, y0 + size)
        return ((x < b) | (x >= w - b))[None, :] | ((y < b) | (y >= h - b))[:, None]

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
        if not self.has_tissue(x0, y0, size):
            tile, variant = self.glass(x0, y0, size)
            if border is None:
                return tile, variant
            tile = tile.copy()
            tile[border] = BORDER.astype(np.uint8)
            return tile, None

        look = self.look
        tissue_sd, tumour_sd, mimic_sd, tone = self.fields(
            x0, y0, size, [FIELD_TISSUE, FIELD_TUMOUR, FIELD_MIMIC, FIELD_TONE]
        )
        tx, ty = x0 + self.tex_offset[0], y0 + self.tex_offset[1]
        alpha = np.clip(0.5 + tissue_sd + self.rough * texture_block(self.tex.rough, ty, tx, size), 0.0, 1.0)
        cellular = np.clip(np.maximum(tumour_sd, mimic_sd) / look.edge + 0.5, 0.0, 1.0)
        fibre = texture_block(self.tex.fibre, ty, tx, size)
        eosin = (look.tone * tone + 1.0) * (
            (0.4 + 0.6 * fibre) * (1.0 - cellular) + (0.25 + 0.3 * fibre) * cellular
        )
        ink = np.zeros((size, size), dtype=np.float32)
        for kind, group in self.nuclei(x0, y0, size).items():
            ink += _render_ink(kind, group, look, x0, y0, size, self.separation)
        planes = (
            1.0 - alpha,
            alpha,
            alpha * cellular,
            alpha * eosin,
            alpha * ink,
            texture_block(self.tex.pixel, ty + 511, tx + 257, size),
        )
        tile = np.empty((size, size, 3), dtype=np.uint8)
        for c in range(3):
            channel = planes[0] * self.colours[0, c] + 0.5
            for plane, colour in zip(planes[1:], self.colours[1:, c], strict=True):
                channel += plane * colour
            tile[..., c] = np.clip(channel, 0, 255)
        if border is not None:
            tile[border] = BORDER.astype(np.uint8)
        return tile, None
