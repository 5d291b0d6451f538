"""Opening whole-slide images: backend choice and fallback, real pyramid levels, mpp, fast region reads.

This module is the one place that opens a slide. It opens the file through MONAI's
:class:`monai.data.WSIReader` (backend ``cucim`` by default, then ``openslide``, then ``tifffile``) and then
reads regions through the fastest path that backend offers:

- cuCIM: ``CuImage.read_region`` with a batch of locations and ``num_workers`` threads.
- OpenSlide: ``OpenSlide.read_region`` per location in a thread pool (it releases the GIL).
- tifffile: only the JPEG/Deflate tiles a region touches are read (``os.pread``) and decoded in a thread
  pool; MONAI's ``TiffFileWSIReader.get_data`` decodes the whole level on every call instead.

Before any backend opens a TIFF, :mod:`smt_monai.data.inspect` checks its header: every page's declared
sizes against the file and a memory budget (a backend that trusts them can abort the process), the pixel
format, the real levels. cuCIM is only used for tiled JPEG (and Aperio JPEG 2000) pyramids, because it
crashes the process on some other encodings (e.g. Deflate with a predictor), and every region it returns as
all zeros is re-read strictly, because it returns black pixels, with no error, for corrupt JPEG tiles.
Whatever the backend, the pyramid levels are the real ones (never an SVS thumbnail, label or macro page),
mpp comes from the file's metadata or is ``None``, and every problem with the file becomes a
:class:`SlideReadError` naming the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from smt_monai.data.errors import SlideReadError
from smt_monai.data.inspect import (
    TIFF_MAGIC,
    TiffInfo,
    check_file,
    check_pixel_format,
    held_tifffile_messages,
    inspect_tiff,
    jpeg_stream_problem,
    touched_chunks,
)

logger = logging.getLogger(__name__)

BACKENDS = ("cucim", "openslide", "tifffile")
WHITE = 255
# The most a reduced read holds at the level's resolution at once (a band of whole blocks of rows).
BAND_BYTES = 64 * 2**20


_CUCIM_IMPORT: list[Any] = []
# cuCIM's import, its file opening and the first read of a slide are serialised: two threads doing these
# at once crashed the process now and then (a segmentation fault while a CacheDataset opened slides on two
# threads). Region reads of opened slides run in parallel.
_CUCIM_LOCK = threading.RLock()


def cucim_available() -> bool:
    """True when cuCIM imports (it is a Linux x86_64 dependency only)."""
    with _CUCIM_LOCK:
        if not _CUCIM_IMPORT:
            try:
                import cucim  # noqa: F401

                _CUCIM_IMPORT.append(True)
            except Exception:  # any failure to load native libraries means: not available
                _CUCIM_IMPORT.append(False)
        return bool(_CUCIM_IMPORT[0])


def slide_id_of(path: str | os.PathLike) -> str:
    """A slide's id: its file name without the extension (``a/b/slide_01.tif`` -> ``slide_01``)."""
    return Path(path).name.rsplit(".", 1)[0]


class Slide:
    """An opened whole-slide image.

    Attributes:
        path: the file.
        backend: ``cucim``, ``openslide`` or ``tifffile``, whichever served the slide.
        level_dimensions: ``(width, height)`` of each real pyramid level, level 0 first.
        level_downsamples: downsample of each level relative to level 0.
        mpp: microns per pixel at level 0 from the file's metadata, or ``None`` when the file holds none.
    """

    def __init__(
        self,
        path: str,
        backend: str,
        handle: Any,
        level_dimensions: Sequence[tuple[int, int]],
        mpp: float | None,
        tiff: TiffInfo | None,
        backend_levels: Sequence[int] | None = None,
    ) -> None:
        self.path = path
        self.backend = backend
        self._handle = handle
        # the backend's index of each level (cuCIM may list pyramid pages the TIFF's series leaves out)
        self._backend_level = (
            list(backend_levels) if backend_levels is not None else list(range(len(level_dimensions)))
        )
        self.level_dimensions = [(int(w), int(h)) for w, h in level_dimensions]
        w0, h0 = self.level_dimensions[0]
        self.level_downsamples = [(w0 / w + h0 / h) / 2.0 for w, h in self.level_dimensions]
        self.mpp = mpp
        self._tiff = tiff
        self._fd: int | None = None
        self._strict_tiff: Any = None
        self._checked_tiles: set[tuple[int, int]] = set()
        self.smallest_level_image: np.ndarray | None = None

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)``."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def slide_id(self) -> str:
        """The file name without its extension, used to key regions and name output folders."""
        return slide_id_of(self.path)

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (its resolution still suffices)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.001:
                best = level
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read one region; see :meth:`read_regions`."""
        return self.read_regions([location], level, size)[0]

    def read_regions(
        self,
        locations: Sequence[tuple[int, int]],
        level: int,
        size: tuple[int, int],
        num_workers: int = 2,
        reduce: int = 1,
    ) -> list[np.ndarray]:
        """Read regions of equal size at one level, in parallel, as ``(h, w, 3)`` uint8 RGB arrays.

        Args:
            locations: top-left ``(x, y)`` of each region in level-0 pixels.
            level: pyramid level to read from.
            size: ``(width, height)`` of each region in pixels of ``level``.
            num_workers: threads decoding at once.
            reduce: return each region averaged over ``reduce`` x ``reduce`` blocks (``PIL.Image.reduce``;
                a last partial block is averaged over its own pixels), ``ceil(h / reduce)`` x
                ``ceil(w / reduce)``.

        Pixels outside the slide are background white. Only the part of a region inside the slide is read,
        and with ``reduce`` it is read in bands of whole blocks of at most :data:`BAND_BYTES` each: a
        low-magnification view of a large slide without coarse levels (a flat TIFF) holds one band at the
        level's resolution, not the whole region.

        Raises:
            SlideReadError: the backend failed or the file's pixel data is corrupt.
        """
        w, h = int(size[0]), int(size[1])
        f = max(1, int(reduce))
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        regions = [np.full((-(-h // f), -(-w // f), 3), WHITE, dtype=np.uint8) for _ in locations]
        # Clip each window to the level; windows of the same clipped size are read in one batch.
        groups: dict[tuple[int, int], list[tuple[int, tuple[int, int], tuple[int, int], int]]] = {}
        for i, (x, y) in enumerate(locations):
            x0, y0 = int(np.floor(x / ds)), int(np.floor(y / ds))
            cx0, cy0 = max(0, x0), max(0, y0)
            cx1, cy1 = min(lw, x0 + w), min(lh, y0 + h)
            if cx0 < cx1 and cy0 < cy1:
                read_at = (int(round(cx0 * ds)), int(round(cy0 * ds)))
                groups.setdefault((cx1 - cx0, cy1 - cy0), []).append((i, read_at, (cx0 - x0, cy0 - y0), cy0))
        try:
            for (cw, ch), members in groups.items():
                rows = ch if f == 1 else max(f, BAND_BYTES // (3 * cw) // f * f)
                if rows >= ch:
                    pieces = self._read_windows([m[1] for m in members], level, (cw, ch), num_workers)
                    for (i, _, (ox, oy), _), piece in zip(members, pieces):
                        _paste_reduced(regions[i], piece, ox, oy, (w, h), f)
                    continue
                for i, (rx, _), (ox, oy), cy0 in members:  # too large to hold at once: whole blocks of rows
                    top = oy
                    while top < oy + ch:
                        bottom = min(oy + ch, top // f * f + rows)
                        at = (rx, int(round((cy0 + top - oy) * ds)))
                        piece = self._read_windows([at], level, (cw, bottom - top), num_workers)[0]
                        _paste_reduced(regions[i], piece, ox, top, (w, h), f)
                        top = bottom
        except SlideReadError:
            raise
        except Exception as exc:
            raise SlideReadError(self.path, f"cannot read pixels ({type(exc).__name__}: {exc})") from None
        return regions

    def _read_windows(
        self, locations: list[tuple[int, int]], level: int, size: tuple[int, int], num_workers: int
    ) -> list[np.ndarray]:
        """Windows inside the level, by the slide's backend (cuCIM batched, the others in a thread pool)."""
        if self.backend == "cucim":
            return self._read_cucim(locations, level, size, num_workers)
        reader = self._read_openslide if self.backend == "openslide" else self._read_tifffile
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            return list(pool.map(reader, locations, [level] * len(locations), [size] * len(locations)))

    def _read_cucim(
        self, locations: list[tuple[int, int]], level: int, size: tuple[int, int], num_workers: int
    ) -> list[np.ndarray]:
        """Windows inside the level, through cuCIM's batched multi-location ``read_region``."""
        self._check_jpeg_tiles(locations, level, size)
        if len(locations) == 1:
            arrays = [
                np.asarray(
                    self._handle.read_region(
                        location=locations[0], size=size, level=self._backend_level[level]
                    )
                )[None]
            ]
        else:
            batches = self._handle.read_region(
                location=locations,
                size=size,
                level=self._backend_level[level],
                num_workers=max(1, num_workers),
                batch_size=len(locations),
            )
            arrays = [np.asarray(b) for b in batches]
        regions = [np.ascontiguousarray(r[..., :3]) for batch in arrays for r in batch]
        for i, (region, loc) in enumerate(zip(regions, locations)):
            if not region.any():
                # cuCIM returns zeros silently for corrupt JPEG tiles: decode those tiles strictly.
                regions[i] = self._read_tifffile(loc, level, size)
        return regions

    def _check_jpeg_tiles(self, locations: list[tuple[int, int]], level: int, size: tuple[int, int]) -> None:
        """Check the marker structure of every JPEG tile the windows touch, each tile once per slide."""
        assert self._tiff is not None
        lvl = self._tiff.levels[level]
        if lvl.compression != 7:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        ds = self.level_downsamples[level]
        for x, y in locations:
            x0, y0 = int(round(x / ds)), int(round(y / ds))
            x1, y1 = min(lvl.width, x0 + size[0]), min(lvl.height, y0 + size[1])
            for index, _, _ in touched_chunks(lvl, x0, y0, x1, y1):
                if (level, index) in self._checked_tiles:
                    continue
                offset, count = lvl.offsets[index], lvl.bytecounts[index]
                head = os.pread(self._fd, min(count, 4096), offset)
                tail = os.pread(self._fd, min(count, 64), offset + count - min(count, 64))
                problem = jpeg_stream_problem(head, tail)
                if problem is not None:
                    raise SlideReadError(self.path, f"corrupt data: {problem} (tile {index}, level {level})")
                self._checked_tiles.add((level, index))

    def _read_openslide(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        rgba = np.asarray(self._handle.read_region(location, self._backend_level[level], size))
        rgb = rgba[..., :3].astype(np.uint16)
        alpha = rgba[..., 3:4].astype(np.uint16)
        # OpenSlide returns premultiplied RGBA; composite on white.
        return (rgb + (255 - alpha)).clip(0, 255).astype(np.uint8)

    def _read_tifffile(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Decode only the tiles (or strips) of ``level`` that the region touches."""
        assert self._tiff is not None
        lvl = self._tiff.levels[level]
        ds = self.level_downsamples[level]
        w, h = size
        x0, y0 = int(round(location[0] / ds)), int(round(location[1] / ds))
        x1, y1 = min(lvl.width, x0 + w), min(lvl.height, y0 + h)
        out = np.full((h, w, 3), WHITE, dtype=np.uint8)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        tw, th = lvl.chunk_width, lvl.chunk_height
        across = -(-lvl.width // tw)
        page = self._tiff_page(level)
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                index = ty * across + tx
                data = os.pread(self._fd, lvl.bytecounts[index], lvl.offsets[index])
                try:
                    tile = page.decode(data, index, jpegtables=page.jpegtables)[0]
                except Exception as exc:
                    raise SlideReadError(
                        self.path, f"corrupt tile {index} at level {level} ({type(exc).__name__}: {exc})"
                    ) from None
                if tile is None:
                    raise SlideReadError(self.path, f"tile {index} at level {level} holds no data")
                tile = tile.reshape(tile.shape[-3:])[..., :3]
                tx0, ty0 = tx * tw, ty * th
                sx0, sy0 = max(x0, tx0), max(y0, ty0)
                sx1, sy1 = min(x1, tx0 + tile.shape[1]), min(y1, ty0 + tile.shape[0])
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[
                    sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0
                ]
        return out

    def _tiff_page(self, level: int) -> Any:
        """The tifffile page of ``level`` (the tifffile backend's handle is a ``TiffFile``)."""
        import tifffile

        assert self._tiff is not None
        tif = self._handle
        if not isinstance(tif, tifffile.TiffFile):
            if self._strict_tiff is None:
                with held_tifffile_messages():  # inspect_tiff has said them, naming the file
                    self._strict_tiff = tifffile.TiffFile(self.path)
            tif = self._strict_tiff
        return tif.pages[self._tiff.levels[level].page_index]

    def read_level(self, level: int) -> np.ndarray:
        """A whole level as one ``(h, w, 3)`` uint8 image (use it for small levels only)."""
        w, h = self.level_dimensions[level]
        return self.read_region((0, 0), level, (w, h))

    def close(self) -> None:
        """Release the file handles."""
        for handle in (self._handle, self._strict_tiff):
            close = getattr(handle, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({self.path!r}, backend={self.backend!r}, levels={self.level_dimensions})"


def _paste_reduced(
    out: np.ndarray, piece: np.ndarray, ox: int, oy: int, size: tuple[int, int], reduce: int
) -> None:
    """Put ``piece`` (the in-slide part of a ``size`` region, at ``(ox, oy)`` in it) into ``out``, the region
    reduced by ``reduce``: the piece is widened with white to whole blocks of the region, so that its blocks
    average exactly what the whole white-padded region's would."""
    if reduce == 1:
        out[oy : oy + piece.shape[0], ox : ox + piece.shape[1]] = piece
        return
    (w, h), ch, cw = size, piece.shape[0], piece.shape[1]
    ax0, ay0 = ox // reduce * reduce, oy // reduce * reduce
    ax1, ay1 = min(w, -(-(ox + cw) // reduce) * reduce), min(h, -(-(oy + ch) // reduce) * reduce)
    if (ax0, ay0, ax1, ay1) != (ox, oy, ox + cw, oy + ch):
        block = np.full((ay1 - ay0, ax1 - ax0, 3), WHITE, dtype=np.uint8)
        block[oy - ay0 : oy - ay0 + ch, ox - ax0 : ox - ax0 + cw] = piece
        piece = block
    reduced = np.asarray(Image.fromarray(np.ascontiguousarray(piece)).reduce(reduce))
    by, bx = ay0 // reduce, ax0 // reduce
    out[by : by + reduced.shape[0], bx : bx + reduced.shape[1]] = reduced


def _open_with(path: str, backend: str, tiff: TiffInfo | None) -> Slide:
    """Open ``path`` with one backend through MONAI's WSIReader and wrap it as a :class:`Slide`."""
    from monai.data import WSIReader

    backend_levels = None
    if backend == "cucim":
        assert tiff is not None
        with _CUCIM_LOCK:
            handle = WSIReader(backend="cucim").read(path)
        seen = [tuple(int(v) for v in d) for d in handle.resolutions["level_dimensions"]]
        dims = [(lvl.width, lvl.height) for lvl in tiff.levels]
        if not set(dims) <= set(seen):
            raise ValueError(f"cuCIM sees pyramid levels {seen}, the TIFF header {dims}")
        backend_levels = [seen.index(d) for d in dims]
    elif backend == "openslide":
        handle = WSIReader(backend="openslide").read(path)
        dims = list(handle.level_dimensions)
    else:
        assert tiff is not None
        with held_tifffile_messages():  # inspect_tiff has said them, naming the file
            handle = WSIReader(backend="tifffile").read(path)
        dims = [(lvl.width, lvl.height) for lvl in tiff.levels]
    mpp = tiff.mpp if tiff is not None else None
    if mpp is None and backend == "openslide":
        with contextlib.suppress(KeyError, ValueError):
            mpp = float(handle.properties["openslide.mpp-x"])
    return Slide(path, backend, handle, dims, mpp, tiff, backend_levels)


def _unusable_reason(backend: str, is_tiff: bool, tiff: TiffInfo | None, path: str) -> str | None:
    """Why ``backend`` must not be tried on this file, or ``None`` when it may."""
    if backend == "cucim":
        if not cucim_available():
            return "cuCIM is not installed"
        if tiff is None:
            return "cuCIM reads only TIFF-based slides"
        if not tiff.cucim_safe:
            codes = sorted({lvl.compression for lvl in tiff.levels})
            return f"cuCIM is not used for TIFF compression {codes} (it can crash on it)"
    elif backend == "openslide":
        import openslide

        if openslide.OpenSlide.detect_format(path) is None:
            return "OpenSlide does not recognise the format"
    elif not is_tiff:
        return "tifffile reads only TIFF files"
    elif tiff is not None and not tiff.chunks_fit:
        return "tifffile decodes whole strips, and this slide's exceed the memory budget"
    return None


def open_slide(path: str | os.PathLike, backend: str = "auto") -> Slide:
    """Open a slide with the first backend that can read it safely, and check it is usable.

    Args:
        path: slide file (SVS, pyramidal TIFF, or any format OpenSlide reads).
        backend: ``auto`` (cuCIM, then OpenSlide, then tifffile) or one of those names to force it.

    Returns:
        The opened :class:`Slide`; its smallest level has been decoded once as a check.

    Raises:
        SlideReadError: the file is missing, empty, truncated, corrupt, not 8-bit RGB, or no backend reads it.
        ValueError: ``backend`` is not a known name.
    """
    path = os.fspath(path)
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    magic = check_file(path)
    is_tiff = magic in TIFF_MAGIC
    tiff = inspect_tiff(path) if is_tiff else None
    if tiff is not None:
        check_pixel_format(path, tiff)
    candidates = BACKENDS if backend == "auto" else (backend,)
    reasons: list[str] = []
    for name in candidates:
        reason = _unusable_reason(name, is_tiff, tiff, path)
        if reason is not None:
            reasons.append(reason)
            continue
        try:
            slide = _open_with(path, name, tiff)
        except Exception as exc:
            reasons.append(f"{name} failed ({type(exc).__name__}: {exc})")
            continue
        try:
            w, h = slide.level_dimensions[-1]
            with _CUCIM_LOCK if name == "cucim" else contextlib.nullcontext():
                smallest = slide.read_region((0, 0), slide.level_count - 1, (min(w, 8192), min(h, 8192)))
        except SlideReadError as exc:
            slide.close()
            raise SlideReadError(path, exc.problem) from None
        if (w, h) == smallest.shape[1::-1]:
            slide.smallest_level_image = smallest
        logger.debug("opened %s with %s", path, name)
        return slide
    if not is_tiff and backend == "auto" and all("recognise" in r or "TIFF" in r for r in reasons):
        raise SlideReadError(path, f"not a slide: no backend reads this format (file starts with {magic!r})")
    raise SlideReadError(path, "; ".join(reasons))
