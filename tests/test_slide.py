"""Opening slides: backend choice and fallback, real levels, mpp, bad input, region reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import scene, write_tiff

from smt_monai.data import SlideReadError, open_slide
from smt_monai.data.slide import cucim_available

BACKENDS = ["openslide", "tifffile"] + (["cucim"] if cucim_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_levels_mpp_and_backend(tiny_slide: Path, backend: str) -> None:
    with open_slide(tiny_slide, backend) as slide:
        assert slide.backend == backend
        assert slide.level_dimensions == [(1024, 768), (256, 192)]
        assert slide.level_downsamples == pytest.approx([1.0, 4.0])
        assert slide.mpp == pytest.approx(0.5)


def test_auto_prefers_cucim_then_openslide(tiny_slide: Path) -> None:
    with open_slide(tiny_slide) as slide:
        assert slide.backend == ("cucim" if cucim_available() else "openslide")


@pytest.mark.parametrize("backend", ["auto", "openslide", "tifffile"])
def test_aperio_reports_only_real_levels(aperio_slide: Path, backend: str) -> None:
    with open_slide(aperio_slide, backend) as slide:
        assert slide.level_dimensions == [(2220, 2967)]
        assert slide.level_downsamples == [1.0]
        assert slide.mpp == pytest.approx(0.499)


def test_same_region_through_every_backend(aperio_slide: Path) -> None:
    regions = {}
    for backend in BACKENDS:
        with open_slide(aperio_slide, backend) as slide:
            regions[backend] = slide.read_region((600, 900), 0, (300, 200)).astype(int)
    reference = regions["tifffile"]
    assert reference.shape == (200, 300, 3)
    for backend, region in regions.items():
        assert np.abs(region - reference).mean() < 2.0, backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_outside_the_slide_is_white(tiny_slide: Path, backend: str) -> None:
    with open_slide(tiny_slide, backend) as slide:
        region = slide.read_region((-50, 700), 0, (100, 100))
    assert (region[:, :50] == 255).all()  # left of the slide
    assert (region[68:] == 255).all()  # below the slide (768 - 700 = 68 rows inside)
    assert region[:68, 50:].min() < 255


def test_mpp_unknown_without_resolution(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "nores.tif", scene(256, 256), downsamples=(1,), mpp=None)
    for backend in BACKENDS:
        with open_slide(path, backend) as slide:
            assert slide.mpp is None, backend


def test_single_level_small_non_square_slide(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "small.tif", scene(96, 200), downsamples=(1,), tile=16)
    with open_slide(path) as slide:
        assert slide.level_dimensions == [(200, 96)]
        assert slide.read_region((0, 0), 0, (256, 256)).shape == (256, 256, 3)


def test_rgba_is_read_as_rgb(tmp_path: Path) -> None:
    rgba = np.concatenate([scene(256, 256), np.full((256, 256, 1), 255, np.uint8)], axis=-1)
    path = write_tiff(tmp_path / "rgba.tif", rgba, compression="zlib", extrasamples=["unassalpha"])
    with open_slide(path) as slide:
        region = slide.read_region((0, 0), 0, (256, 256))
    assert region.shape == (256, 256, 3)
    assert np.abs(region.astype(int) - scene(256, 256)).max() <= 1


def test_deflate_with_predictor_is_not_sent_to_cucim(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "deflate.tif", scene(512, 512), compression="zlib", predictor=True)
    with open_slide(path) as slide:
        assert slide.backend == "openslide"
        assert np.abs(slide.read_region((0, 0), 0, (512, 512)).astype(int) - scene(512, 512)).max() <= 1
    with pytest.raises(SlideReadError, match="cuCIM is not used for TIFF compression"):
        open_slide(path, "cucim")


def test_tifffile_decodes_only_touched_tiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tiff(tmp_path / "big.tif", scene(1024, 1024), downsamples=(1,), tile=64)
    reads: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        reads.append(offset)
        return real_pread(fd, n, offset)

    with open_slide(path, "tifffile") as slide:
        monkeypatch.setattr(os, "pread", counting_pread)
        slide.read_region((70, 70), 0, (100, 60))  # columns 70-169, rows 70-129: 2 x 2 tiles
    assert len(reads) == 4


def _truncated(tmp_path: Path) -> Path:
    path = write_tiff(tmp_path / "truncated.tif", scene(1024, 1024), downsamples=(1, 4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def corrupt_tile(path: Path, page: int, tile: int, how: str) -> Path:
    """Damage one JPEG tile as real broken slides are damaged: a bogus marker length, zeros, or truncation."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[page].dataoffsets[tile], tif.pages[page].databytecounts[tile]
    data = bytearray(path.read_bytes())
    if how == "marker":
        data[offset + 2 : offset + 6] = b"\xff\xdb\x00\x01"
    elif how == "zeros":
        data[offset : offset + count] = bytes(count)
    else:
        data[offset + count // 2 : offset + count] = bytes(count - count // 2)
    path.write_bytes(bytes(data))
    return path


def _corrupt_jpeg_tile(tmp_path: Path) -> Path:
    path = write_tiff(tmp_path / "corrupt.svs", scene(512, 512), downsamples=(1, 4))
    return corrupt_tile(path, page=1, tile=0, how="marker")


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_FILES = {
    "missing": (lambda p: p / "nowhere.svs", "does not exist"),
    "zero-byte": (lambda p: _file(p / "empty.svs", b""), "empty"),
    "text named .svs": (lambda p: _file(p / "notes.svs", b"not a slide\n"), "not a slide"),
    "PNG named .tif": (lambda p: _file(p / "image.tif", b"\x89PNG\r\n\x1a\n" + bytes(64)), "not a slide"),
    "truncated": (_truncated, "truncated"),
    "corrupt header": (
        lambda p: _file(p / "garbage.tif", b"II*\x00" + bytes(range(64))),
        "corrupt",
    ),
    "grayscale": (
        lambda p: write_tiff(p / "gray.tif", scene(256, 256)[..., :1], compression="zlib"),
        "grayscale",
    ),
    "16-bit": (
        lambda p: write_tiff(p / "deep.tif", scene(256, 256).astype(np.uint16) * 256, compression="zlib"),
        "16-bit",
    ),
    "corrupt JPEG tile": (_corrupt_jpeg_tile, "corrupt|cannot read|failed"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_input_raises_slide_read_error(tmp_path: Path, case: str) -> None:
    make, pattern = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(SlideReadError, match=pattern) as info:
        open_slide(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("how", ["marker", "zeros", "truncated"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_jpeg_tile_raises_when_read(tmp_path: Path, backend: str, how: str) -> None:
    """cuCIM decodes corrupt JPEG tiles to zeros or garbage silently; the project must raise instead."""
    path = corrupt_tile(write_tiff(tmp_path / "late.svs", scene(512, 512)), page=0, tile=5, how=how)
    with open_slide(path, backend) as slide:
        slide.read_region((0, 256), 0, (256, 256))  # intact tiles still read
        with pytest.raises(SlideReadError, match="corrupt|Premature|failed|cannot read") as info:
            slide.read_region((5 * 64, 0), 0, (64, 64))
    assert str(path) in str(info.value)


def test_unknown_backend_name() -> None:
    with pytest.raises(ValueError, match="backend"):
        open_slide("x.svs", "bioformats")


def test_cli_info_text_and_json(tiny_slide: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from smt_monai.cli import main

    assert main(["info", str(tiny_slide), "--backend", "tifffile"]) == 0
    assert "tissue:  1 section, 0.06 mm^2, x" in capsys.readouterr().out
    out = subprocess.run(
        [sys.executable, "-m", "smt_monai", "info", str(tiny_slide), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(out.stdout)
    assert [lvl["downsample"] for lvl in info["levels"]] == [1.0, 4.0]
    assert info["mpp"] == pytest.approx(0.5)
    # the scene's pink rectangle: 384 x 614 px at 0.5 um/px
    assert info["tissue_sections"] == 1 and info["tissue_mm2"] == pytest.approx(0.192 * 0.307, rel=0.25)
    assert out.stderr == ""


def test_cli_info_bad_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "notes.svs"
    path.write_text("hello")
    out = subprocess.run(
        [sys.executable, "-m", "smt_monai", "info", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert str(path) in out.stderr


def test_every_name_the_data_package_exports_resolves() -> None:
    """``smt_monai.data`` loads its modules on first use; each exported name must load from its module."""
    import smt_monai.data as data

    assert set(data.__all__) == set(data._MODULE_OF)
    assert all(getattr(data, name).__name__ == name for name in data.__all__ if name != "BACKENDS")
    assert set(data.__all__) <= set(dir(data))
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        data.missing  # noqa: B018


def test_a_pyramid_whose_series_skip_a_level_reads_with_every_backend(tmp_path: Path) -> None:
    """Downsamples 1, 4, 8: tifffile's first series holds levels 1 and 4 only, cuCIM lists all three pages;
    the slide keeps the series' levels and reads each from the backend's matching level."""
    path = write_tiff(tmp_path / "steps.tif", scene(768, 1024), downsamples=(1, 4, 8))
    regions = []
    for backend in ("cucim", "tifffile"):
        if backend == "cucim" and not cucim_available():
            continue
        with open_slide(path, backend) as slide:
            assert slide.level_dimensions == [(1024, 768), (256, 192)]
            regions.append(slide.read_region((256, 192), 1, (64, 64)))
    for region in regions[1:]:
        assert np.abs(region.astype(int) - regions[0].astype(int)).mean() < 2
