"""Declared sizes checked before any reader allocates: crafted TIFFs through open_slide and `smt-monai info`.

Each crafted file is one a reader trusts to its cost: OpenSlide aborts the whole process on the huge tile
(GLib cannot allocate 2.7 TiB, exit 134), a 0 x 0 image divides by zero, and tifffile serves a JPEG-tiled
0 x 0 page as a slide of its first tile's size.
"""

from __future__ import annotations

import logging
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import scene, write_tiff

from smt_monai.data import SlideReadError, inspect, open_slide
from smt_monai.data.inspect import inspect_tiff

_SHORT_TAGS = {258, 259, 262, 277, 284}


def raw_tiff(path: Path, tags: dict[int, list[int] | str], chunks: list[bytes], ndpi: bool = False) -> Path:
    """Write a little-endian one-IFD TIFF by hand: ``tags`` (code -> values) plus the chunks' offsets and
    byte counts (TileOffsets/TileByteCounts when TileWidth is among ``tags``, else the strip tags).

    ``ndpi``: lay it out as Hamamatsu NDPI (a classic TIFF whose readers take 64-bit offsets: zero high
    words after the header and after the IFD), as tifffile reads files named ``.ndpi``.
    """
    tiled = 322 in tags
    pad = 4 if ndpi else 0

    def pack(offsets: list[int]) -> bytes:
        entries = {
            **tags,
            (324 if tiled else 273): offsets,
            (325 if tiled else 279): [len(c) for c in chunks],
        }
        tail = 4 + (4 + 4 * len(entries) if ndpi else 0)
        head = 8 + pad + 2 + 12 * len(entries) + tail
        ifd, extra = struct.pack("<H", len(entries)), b""
        for code, values in sorted(entries.items()):
            kind, fmt = (3, "H") if code in _SHORT_TAGS else (4, "I")
            if isinstance(values, str):
                kind, raw, count = 2, values.encode() + b"\0", len(values) + 1
            else:
                raw, count = struct.pack(f"<{len(values)}{fmt}", *values), len(values)
            if len(raw) <= 4:
                ifd += struct.pack("<HHI", code, kind, count) + raw.ljust(4, b"\0")
            else:
                ifd += struct.pack("<HHII", code, kind, count, head + len(extra))
                extra += raw
        return b"II*\x00" + struct.pack("<I", 8 + pad) + bytes(pad) + ifd + bytes(tail) + extra

    start = len(pack([0] * len(chunks)))
    offsets = [start + sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
    path.write_bytes(pack(offsets) + b"".join(chunks))
    return path


def rgb_tags(width: int, height: int, **more: int) -> dict[int, list[int]]:
    """Uncompressed 8-bit RGB tags of a ``width`` x ``height`` image; ``more``: ``tile`` or ``rows``."""
    tags = {256: [width], 257: [height], 258: [8, 8, 8], 259: [1], 262: [2], 277: [3], 284: [1]}
    if "tile" in more:
        tags[322] = tags[323] = [more["tile"]]
    else:
        tags[278] = [more.get("rows", height)]
    return tags


def patch_tag(path: Path, page: int, code: int, value: int, index: int = 0) -> Path:
    """Overwrite value ``index`` of tag ``code`` of ``page`` in place, as a damaged file would hold it."""
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[page].tags[code]
        fmt = tif.byteorder + {3: "H", 4: "I", 16: "Q"}[int(tag.dtype)]
        where = tag.valueoffset + index * struct.calcsize(fmt)
    data = bytearray(path.read_bytes())
    data[where : where + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(data))
    return path


def _huge_tile(p: Path) -> Path:
    return raw_tiff(p / "huge.tif", rgb_tags(10**6, 10**6, tile=10**6), [bytes(64)])


def _zero_uncompressed(p: Path) -> Path:
    return raw_tiff(p / "zero.tif", rgb_tags(0, 0, rows=1), [bytes(64)])


def _zero_jpeg(p: Path) -> Path:
    path = write_tiff(p / "zero_jpeg.tif", scene(64, 64), downsamples=(1,))
    return patch_tag(patch_tag(path, 0, 256, 0), 0, 257, 0)


def _offset_past_end(p: Path) -> Path:
    path = write_tiff(p / "past_end.tif", scene(256, 256), downsamples=(1,))
    return patch_tag(path, 0, 324, path.stat().st_size + 1000, index=5)


def _offsets_count(p: Path) -> Path:
    return patch_tag(write_tiff(p / "count.tif", scene(512, 512), downsamples=(1,)), 0, 256, 1024)


def _zero_tiles(p: Path) -> Path:
    return raw_tiff(p / "zero_tiles.tif", {**rgb_tags(64, 64, tile=64), 322: [0]}, [bytes(64 * 64 * 3)])


def _uncompressed_short(p: Path) -> Path:
    return raw_tiff(p / "short.tif", rgb_tags(64, 64, tile=64), [bytes(100)])


def _bad_label_page(p: Path) -> Path:
    """A good pyramid followed by a label-like page (not a level) whose strips lie past the end."""
    path = p / "label.svs"
    with tifffile.TiffWriter(path) as tif:
        tif.write(scene(256, 256), tile=(64, 64), compression="jpeg")
        tif.write(scene(64, 256), compression="zlib", rowsperstrip=16)
    return patch_tag(path, 1, 273, path.stat().st_size + 10, index=2)


CRAFTED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "huge tile": (
        _huge_tile,
        r"page 0 declares a 1000000 x 1000000 px tile \(2.7 TiB decoded, .*\) in a \d+-byte",
    ),
    "0 x 0 uncompressed": (_zero_uncompressed, "page 0 declares a 0 x 0 px image"),
    "0 x 0 JPEG-tiled": (_zero_jpeg, "page 0 declares a 0 x 0 px image"),
    "offset past the end": (
        _offset_past_end,
        r"truncated TIFF: page 0 \(256 x 256 px\) has tile data beyond",
    ),
    "offsets count": (
        _offsets_count,
        "page 0 has 64 tile offsets where its 1024 x 512 px image in 64 x 64 px",
    ),
    "0-wide tiles": (_zero_tiles, "page 0 declares 0 x 64 px tiles"),
    "uncompressed tile short": (_uncompressed_short, "uncompressed tile 0 of 100 bytes where a 64 x 64 px"),
    "bad label page": (_bad_label_page, "truncated TIFF: page 1 .* strip data beyond the end"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_tiff_raises_slide_read_error(tmp_path: Path, case: str) -> None:
    make, pattern = CRAFTED[case]
    path = make(tmp_path)
    for backend in ("auto", "openslide", "tifffile"):
        with pytest.raises(SlideReadError, match=pattern) as info:
            open_slide(path, backend)
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "case", ["huge tile", "0 x 0 uncompressed", "0 x 0 JPEG-tiled", "offset past the end", "offsets count"]
)
def test_cli_info_on_crafted_tiff_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    make, pattern = CRAFTED[case]
    path = make(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "smt_monai", "info", str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"error: {path}: ")
    assert "Traceback" not in out.stderr


def _broken_page_chain(p: Path) -> Path:
    """A three-level pyramid whose second page points its next page past the end of the file."""
    path = write_tiff(p / "chain.tif", scene(768, 1024), downsamples=(1, 4, 16))
    with tifffile.TiffFile(path) as tif:
        ifd = tif.pages[1].offset
    data = bytearray(path.read_bytes())
    (count,) = struct.unpack_from("<H", data, ifd)
    struct.pack_into("<I", data, ifd + 2 + 12 * count, len(data) + 5000)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("backend", ["auto", "tifffile"])
def test_broken_page_chain_reads_the_levels_before_it_with_one_warning_naming_the_file(
    tmp_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """tifffile logs the break bare (``<tifffile.TiffPages @8> invalid page offset``); said once, named."""
    path = _broken_page_chain(tmp_path)
    with caplog.at_level(logging.WARNING), open_slide(path, backend) as slide:
        assert slide.level_dimensions == [(1024, 768), (256, 192)]
        assert slide.read_region((0, 0), 0, (64, 64)).shape == (64, 64, 3)
    assert [r.name for r in caplog.records] == ["smt_monai.data.inspect"]
    assert caplog.records[0].getMessage() == (
        f"{path}: TIFF header: invalid page offset {path.stat().st_size + 5000} "
        "(read with the 2 pyramid levels found)"
    )


def test_cli_info_on_broken_page_chain_names_the_file(tmp_path: Path) -> None:
    path = _broken_page_chain(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "smt_monai", "info", str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "0: 1024 x 768" in out.stdout and "1: 256 x 192" in out.stdout and "2: " not in out.stdout
    assert "<tifffile" not in out.stderr
    assert f"{path}: TIFF header: invalid page offset" in out.stderr


def test_good_uncompressed_slides_open(tmp_path: Path) -> None:
    """Uncompressed tiles, and strips whose last one is short, hold exactly their decoded size."""
    tiled = write_tiff(tmp_path / "raw_tiles.tif", scene(200, 256), downsamples=(1, 4), compression=None)
    strips = tmp_path / "raw_strips.tif"
    tifffile.imwrite(strips, scene(230, 256), rowsperstrip=50)
    for path, dims in ((tiled, (256, 200)), (strips, (256, 230))):
        for backend in ("auto", "tifffile"):
            with open_slide(path, backend) as slide:
                assert slide.dimensions == dims
                region = slide.read_region((0, 0), 0, dims)
            assert np.array_equal(region, tifffile.imread(path, level=0)[: dims[1], : dims[0]])


def test_chunk_budget_is_a_parameter(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "tiles.tif", scene(256, 256), downsamples=(1,), tile=64)
    assert inspect_tiff(str(path)).levels[0].chunk_bytes == 64 * 64 * 3
    with pytest.raises(SlideReadError, match=r"64 x 64 px tile \(12 KiB decoded, over the 10 KiB budget\)"):
        inspect_tiff(str(path), chunk_budget=10 * 1024)


def test_ndpi_jpeg_strips_may_exceed_the_budget_but_not_for_tifffile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSlide decodes NDPI's one-strip JPEG levels piecewise; tifffile would decode the whole strip."""
    tags = {**rgb_tags(4096, 4096), 259: [7], 262: [6]}
    ndpi = raw_tiff(tmp_path / "scan.ndpi", {**tags, 271: "Hamamatsu", 65420: [1]}, [bytes(4096)], ndpi=True)
    plain = raw_tiff(tmp_path / "scan.tif", tags, [bytes(4096)])
    budget = 10 * 2**20
    assert inspect_tiff(str(ndpi)).chunks_fit
    assert not inspect_tiff(str(ndpi), chunk_budget=budget).chunks_fit
    with pytest.raises(
        SlideReadError, match=r"4096 x 4096 px strip \(48 MiB decoded, over the 10 MiB budget"
    ):
        inspect_tiff(str(plain), chunk_budget=budget)
    monkeypatch.setattr(inspect, "CHUNK_BUDGET", budget)
    with pytest.raises(
        SlideReadError, match="tifffile decodes whole strips, and this slide's exceed the memory"
    ):
        open_slide(ndpi, "tifffile")
