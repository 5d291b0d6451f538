"""Checking a slide file before any reader touches it: the file itself, the TIFF header, declared sizes.

The readers trust a TIFF's header. OpenSlide allocates a whole tile's decoded size before it reads the
tile and aborts the process when that fails (GLib: ``failed to allocate 4000000000000 bytes``, exit 134),
which no ``try`` catches; a 0 x 0 image divides by zero; tifffile reads the size of a JPEG tile when the
header declares a 0 x 0 image and serves it as a slide. So every page that any backend may decode (pyramid
levels, SVS thumbnail, label and macro pages, SubIFDs) is checked here against the file's size and a memory
budget, from the header alone (tifffile's IFD parsing, which checks that tag values lie in the file; no
pixel is decoded), before a backend opens the file. Each problem is a :class:`SlideReadError` naming the
file and what is wrong, on one line.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from smt_monai.data.errors import SlideReadError

logger = logging.getLogger(__name__)

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# The most one tile (or strip) may decode to: a reader holds at least one decoded tile in memory at a time.
CHUNK_BUDGET = 512 * 2**20
# TIFF compression codes cuCIM decodes without risk: JPEG, Aperio JPEG 2000 (YCbCr and RGB).
_CUCIM_SAFE_COMPRESSION = {7, 33003, 33005}
_UNCOMPRESSED = 1
_JPEG = 7
# A compressed tile larger than twice its decoded size plus this is logged as suspicious (tiny JPEG tiles
# carry tables that can outweigh their pixels).
_COMPRESSED_SLACK = 64 * 2**10
# tifffile names the object, not the file, in what it logs: ``<tifffile.TiffPages @8> invalid page offset 1``.
_TIFFFILE_OBJECT = re.compile(r"<tifffile\.\w+ @\d+>\s*")


def check_file(path: str) -> bytes:
    """Check that ``path`` is a non-empty regular file that can be opened; return its first 4 bytes.

    Raises:
        SlideReadError: missing, not a regular file, empty, or unreadable.
    """
    if not os.path.exists(path):
        raise SlideReadError(path, "file does not exist")
    if not os.path.isfile(path):
        raise SlideReadError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise SlideReadError(path, "file is empty (0 bytes)")
    try:
        with open(path, "rb") as fh:
            return fh.read(4)
    except OSError as exc:
        raise SlideReadError(path, f"cannot open file ({exc.strerror})") from None


@dataclass
class TiffLevel:
    """One real pyramid level of a TIFF: page index, size, tiling, encoding, one chunk's decoded size."""

    page_index: int
    width: int
    height: int
    chunk_width: int
    chunk_height: int
    compression: int
    offsets: tuple[int, ...]
    bytecounts: tuple[int, ...]
    chunk_bytes: int


@dataclass
class TiffInfo:
    """What the TIFF header says about a slide, read without decoding any pixel.

    ``chunks_fit`` is false only for NDPI slides whose JPEG strips decode beyond the memory budget: OpenSlide
    reads them piecewise, a reader that decodes whole strips must not.
    """

    levels: list[TiffLevel]
    samples_per_pixel: int
    bits_per_sample: int
    mpp: float | None
    cucim_safe: bool
    chunks_fit: bool


def _human_bytes(n: float) -> str:
    """``3000000000000`` -> ``2.7 TiB``, ``536870912`` -> ``512 MiB``."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while n >= 1024 and power < len(units) - 1:
        n /= 1024
        power += 1
    return f"{n:.1f}".rstrip("0").rstrip(".") + f" {units[power]}"


@dataclass
class _Chunking:
    """A page's declared geometry, from its raw tags (tifffile adjusts some of them while parsing)."""

    width: int
    height: int
    depth: int
    chunk_width: int
    chunk_height: int
    chunk_depth: int
    tiled: bool
    planes: int
    row_bytes: int

    @property
    def chunk_bytes(self) -> int:
        """Decoded bytes of one full tile (or strip)."""
        return self.row_bytes * self.chunk_height * self.chunk_depth

    @property
    def kind(self) -> str:
        return "tile" if self.tiled else "strip"

    def chunk_count(self) -> int:
        """How many tiles (or strips) the declared sizes imply."""
        return (
            self.planes
            * -(-self.depth // self.chunk_depth)
            * -(-self.height // self.chunk_height)
            * -(-self.width // self.chunk_width)
        )

    def stored_bytes(self, index: int) -> set[int]:
        """The byte counts an uncompressed chunk may have: its full size, or for the last strip of a plane
        the rows it holds."""
        if self.tiled:
            return {self.chunk_bytes}
        strips = -(-self.height // self.chunk_height)
        rows = min(self.chunk_height, self.height - (index % strips) * self.chunk_height)
        return {self.chunk_bytes, self.row_bytes * rows * self.chunk_depth}


def _tag(page: Any, code: int, default: int) -> int:
    """The first value of tag ``code`` of ``page`` as stored in the file, or ``default``."""
    return int(np.atleast_1d(page.tags.valueof(code, default))[0])


def _chunking(page: Any) -> _Chunking:
    """The declared image and tile (or strip) sizes of ``page``."""
    width, height, depth = _tag(page, 256, 0), _tag(page, 257, 0), _tag(page, 32997, 1)
    tiled = 322 in page.tags
    if tiled:
        chunk_w, chunk_h, chunk_d = _tag(page, 322, 0), _tag(page, 323, 0), _tag(page, 32998, 1)
    else:
        chunk_w, chunk_h, chunk_d = width, min(_tag(page, 278, 2**32 - 1), height), depth
    samples = int(page.samplesperpixel)
    planes = samples if page.planarconfig == 2 and samples > 1 else 1
    bits = (
        int(np.sum(page.bitspersample))
        if isinstance(page.bitspersample, tuple)
        else page.bitspersample * samples
    )
    row_bytes = math.ceil(chunk_w * bits / planes / 8)
    return _Chunking(width, height, depth, chunk_w, chunk_h, chunk_d, tiled, planes, row_bytes)


def _size_problem(page: Any, path: str, file_size: int, chunk_budget: int, ndpi: bool) -> str | None:
    """What is wrong with the sizes ``page`` declares, or ``None``: checked before anything is allocated.

    The image and its tiles (or strips) must have a size; the offsets must be as many as the size implies
    and lie inside the file; one decoded chunk must fit ``chunk_budget`` (except NDPI's JPEG levels, which
    OpenSlide decodes piecewise through their restart markers); uncompressed chunks must hold exactly their
    decoded size. Compressed chunks far larger than their decoded size are logged as suspicious.
    """
    c = _chunking(page)
    where = f"page {page.index}"
    if c.width <= 0 or c.height <= 0 or c.depth <= 0:
        return f"{where} declares a {c.width} x {c.height} px image"
    if c.chunk_width <= 0 or c.chunk_height <= 0 or c.chunk_depth <= 0:
        return f"{where} declares {c.chunk_width} x {c.chunk_height} px {c.kind}s"
    offsets, counts = page.dataoffsets, page.databytecounts
    if len(offsets) != c.chunk_count():
        return (
            f"{where} has {len(offsets)} {c.kind} offsets where its {c.width} x {c.height} px image in "
            f"{c.chunk_width} x {c.chunk_height} px {c.kind}s needs {c.chunk_count()}"
        )
    if len(counts) != len(offsets):
        return f"{where} has {len(offsets)} {c.kind} offsets but {len(counts)} byte counts"
    compression = int(page.compression)
    if c.chunk_bytes > chunk_budget and not (ndpi and compression == _JPEG):
        return (
            f"{where} declares a {c.chunk_width} x {c.chunk_height} px {c.kind} "
            f"({_human_bytes(c.chunk_bytes)} decoded, over the {_human_bytes(chunk_budget)} budget) "
            f"in a {file_size}-byte file"
        )
    if any(off + cnt > file_size for off, cnt in zip(offsets, counts)):
        return (
            f"truncated TIFF: {where} ({c.width} x {c.height} px) has {c.kind} data beyond the end of the "
            f"file ({file_size} bytes)"
        )
    if compression == _UNCOMPRESSED:
        for i, cnt in enumerate(counts):
            if cnt not in c.stored_bytes(i):
                return (
                    f"{where} declares uncompressed {c.kind} {i} of {cnt} bytes where a "
                    f"{c.chunk_width} x {c.chunk_height} px {c.kind} holds {c.chunk_bytes}"
                )
    elif counts and max(counts) > 2 * c.chunk_bytes + _COMPRESSED_SLACK:
        logger.warning(
            "%s: %s has a compressed %s of %d bytes, far more than its decoded %d bytes",
            path,
            where,
            c.kind,
            max(counts),
            c.chunk_bytes,
        )
    return None


def _decodable_pages(tif: Any) -> list[Any]:
    """Every page of ``tif`` a backend may decode: the IFD chain and, recursively, SubIFDs."""
    pages: list[Any] = []
    todo = list(tif.pages)
    while todo:
        page = todo.pop(0)
        pages.append(page)
        if page.subifds:
            todo.extend(page.pages)
    return pages


def _tiff_mpp(page: Any) -> float | None:
    """Microns per pixel from Aperio's ``MPP =`` or from resolution tags with a real unit; else ``None``."""
    match = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", page.description or "")
    if match:
        with contextlib.suppress(ValueError):
            value = float(match.group(1))
            if value > 0:
                return value
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        per_unit_um = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimeter; 1 = no absolute unit
        if per_unit_um and num > 0 and den > 0:
            return per_unit_um * den / num
    return None


@contextlib.contextmanager
def held_tifffile_messages() -> Iterator[list[str]]:
    """Hold back what tifffile logs from this thread inside the block, and hand it over as text.

    tifffile logs header anomalies (a page chain pointing past the end of the file, a tag it cannot read) on
    its own logger, naming neither the file nor what follows; the caller says it once, naming the file.
    Other threads' messages (slides opened side by side) pass untouched.
    """
    held: list[str] = []
    thread = threading.get_ident()

    def hold(record: logging.LogRecord) -> bool:
        if record.thread != thread:
            return True
        held.append(_TIFFFILE_OBJECT.sub("", record.getMessage()))
        return False

    tifffile_logger = logging.getLogger("tifffile")
    tifffile_logger.addFilter(hold)
    try:
        yield held
    finally:
        tifffile_logger.removeFilter(hold)


def inspect_tiff(path: str, chunk_budget: int | None = None) -> TiffInfo:
    """Read a TIFF's header: check declared sizes, then find the real pyramid levels, pixel format, mpp, and
    whether cuCIM may read it.

    Real levels are the pages of tifffile's first series (the baseline pyramid; SVS thumbnail, label and
    macro pages are separate series) whose aspect ratio matches level 0 and whose size decreases. What
    tifffile finds odd in a header it can still read (a page chain broken off: the levels before the break
    are read) is logged as one warning naming the file.

    Args:
        path: the TIFF file.
        chunk_budget: the most bytes one tile or strip may decode to; ``None``: :data:`CHUNK_BUDGET`.

    Raises:
        SlideReadError: the file is not a readable TIFF, or a page declares sizes that do not fit the file or
            the budget.
    """
    import tifffile

    budget = CHUNK_BUDGET if chunk_budget is None else chunk_budget
    size = os.path.getsize(path)
    try:
        with held_tifffile_messages() as held, tifffile.TiffFile(path) as tif:
            ndpi = tif.is_ndpi
            for page in _decodable_pages(tif):
                problem = _size_problem(page, path, size, budget, ndpi)
                if problem is not None:
                    raise SlideReadError(path, problem)
            pages = [lvl.keyframe for lvl in tif.series[0].levels]
            base = pages[0]
            levels: list[TiffLevel] = []
            for page in pages:
                if levels and not (
                    page.imagewidth < levels[-1].width
                    and abs(page.imagewidth / page.imagelength - base.imagewidth / base.imagelength)
                    < 0.02 * base.imagewidth / base.imagelength
                ):
                    continue
                chunking = _chunking(page)
                levels.append(
                    TiffLevel(
                        page_index=page.index,
                        width=chunking.width,
                        height=chunking.height,
                        chunk_width=chunking.chunk_width,
                        chunk_height=chunking.chunk_height,
                        compression=int(page.compression),
                        offsets=tuple(page.dataoffsets),
                        bytecounts=tuple(page.databytecounts),
                        chunk_bytes=chunking.chunk_bytes,
                    )
                )
            if held:
                logger.warning(
                    "%s: TIFF header: %s (read with the %d pyramid levels found)",
                    path,
                    "; ".join(dict.fromkeys(held)),
                    len(levels),
                )
            return TiffInfo(
                levels=levels,
                samples_per_pixel=int(base.samplesperpixel),
                bits_per_sample=int(np.atleast_1d(base.bitspersample)[0]),
                mpp=_tiff_mpp(base),
                cucim_safe=all(lvl.compression in _CUCIM_SAFE_COMPRESSION for lvl in levels)
                and all(pg.is_tiled for pg in pages),
                chunks_fit=all(lvl.chunk_bytes <= budget for lvl in levels),
            )
    except SlideReadError:
        raise
    except Exception as exc:
        raise SlideReadError(path, f"corrupt or unsupported TIFF ({type(exc).__name__}: {exc})") from None


def touched_chunks(lvl: TiffLevel, x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int, int]]:
    """``(index, column, row)`` of the tiles (or strips) of ``lvl`` touched by ``[x0, x1) x [y0, y1)``."""
    across = -(-lvl.width // lvl.chunk_width)
    return [
        (ty * across + tx, tx, ty)
        for ty in range(y0 // lvl.chunk_height, (y1 - 1) // lvl.chunk_height + 1)
        for tx in range(x0 // lvl.chunk_width, (x1 - 1) // lvl.chunk_width + 1)
    ]


def jpeg_stream_problem(head: bytes, tail: bytes) -> str | None:
    """What is wrong with a JPEG tile's marker structure, or ``None``; reads headers only, decodes nothing.

    cuCIM decodes corrupt JPEG tiles to zeros or garbage without an error, so its reads are guarded by this
    check: the stream must start with SOI, every marker segment before SOS must have a sane length, and the
    stream must end with EOI (trailing zero padding allowed).
    """
    if head[:2] != b"\xff\xd8":
        return "JPEG tile does not start with an SOI marker"
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return f"JPEG tile has bytes where a marker should be (offset {pos})"
        marker = head[pos + 1]
        if marker == 0xDA:
            break
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 1 if marker == 0xFF else 2
            continue
        length = int.from_bytes(head[pos + 2 : pos + 4], "big")
        if length < 2:
            return "JPEG tile has a bogus marker length"
        pos += 2 + length
    if tail.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return "JPEG tile is truncated (no EOI marker)"
    return None


def check_pixel_format(path: str, info: TiffInfo) -> None:
    """Reject images that are not 8-bit RGB(A): H&E models expect 8-bit RGB.

    Raises:
        SlideReadError: grayscale, two-channel or non-8-bit images.
    """
    if info.samples_per_pixel < 3:
        raise SlideReadError(
            path, f"grayscale image ({info.samples_per_pixel} channel); H&E models expect 8-bit RGB"
        )
    if info.bits_per_sample != 8:
        raise SlideReadError(path, f"{info.bits_per_sample}-bit image; H&E models expect 8-bit RGB")
