"""Physical scale: every layer reads at the model's um/px whatever the scan's resolution and the specimen's
size; slides without a usable mpp get one clear line, and --default_mpp or the tissue geometry work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import scene, write_tiff

from smt_monai.cli import build_parser
from smt_monai.data import SlideReadError, open_slide
from smt_monai.data.magnification import LayerScale, plausible, scan_mpp
from smt_monai.data.tissue import tissue_components
from smt_monai.inference import SMTPredictor
from smt_monai.networks import SMT

K = 2


def tiny(layer3_mpp: float = 0.5, geometry: str = "physical") -> SMT:
    torch.manual_seed(0)
    return SMT(preset="tiny", geometry=geometry, layer3_mpp=layer3_mpp).eval()


def test_scale_of_a_network_and_its_fields() -> None:
    network = tiny(0.5)
    scale = LayerScale.of(network)
    assert (scale.grid, scale.read_size, scale.geometry) == (4, 32, "physical")
    assert [scale.layer_mpp(layer) for layer in (1, 2, 3)] == [8.0, 2.0, 0.5]
    assert scale.field_um == 16 * 32 * 0.5
    scripted = torch.jit.script(network)
    assert LayerScale.of(scripted) == scale  # a TorchScript export carries its geometry
    with pytest.raises(ValueError, match="geometry"):
        LayerScale(4, 32, "slide")


def test_a_larger_specimen_gets_several_fields_and_still_k_plus_k2_reads(tmp_path: Path) -> None:
    """Tissue of 307 x 192 um (x 20-80 %, y 25-75 % of a 1024 x 768 px slide at 0.5 um/px) against fields of
    256 um: two fields side by side; the slide still reads K regions in layer 2 and K^2 in layer 3, every
    layer-3 region at the model's 0.5 um/px."""
    path = write_tiff(tmp_path / "wide.tif", scene(768, 1024), mpp=0.5)
    predictor = SMTPredictor(tiny(0.5), num_focus=K)
    result = predictor.predict(path)
    assert [len(b) for b in result.boxes] == [2, K, K * K]
    assert np.allclose(result.boxes[0][:, 2], 512.0)  # 256 um at 0.5 um/px
    assert result.focus_map is not None and result.focus_map.shape == (2, 4, 4)
    assert result.mpp == pytest.approx(0.5) and result.read_mpp == pytest.approx(0.5)
    sides_um = result.boxes[2][:, 2] * 0.5 / 32
    assert np.allclose(sides_um, 0.5, rtol=0.1)

    whole = SMTPredictor(tiny(2.0), num_focus=K).predict(path)  # fields of 1 mm: one, centred on the tissue
    assert len(whole.boxes[0]) == 1
    x, y, side = whole.boxes[0][0]
    assert (x + side / 2, y + side / 2) == pytest.approx((0.5 * (204 + 819), 0.5 * (192 + 576)), abs=8)


def test_a_20x_scan_is_read_at_the_same_um_per_px_as_a_40x_one(tmp_path: Path) -> None:
    """The same tissue scanned at 0.25 and at 0.5 um/px: the layer-1 fields cover the same micrometres."""
    image = scene(1536, 2048)
    fine = write_tiff(tmp_path / "x40.tif", image, downsamples=(1, 4, 16), mpp=0.25)
    coarse = write_tiff(tmp_path / "x20.tif", image[::2, ::2].copy(), downsamples=(1, 4, 8), mpp=0.5)
    scale = LayerScale.of(tiny(1.0))
    fields = []
    for path, mpp in ((fine, 0.25), (coarse, 0.5)):
        with open_slide(path) as slide:
            fields.append(scale.layer1_boxes(slide) * mpp)
    np.testing.assert_allclose(fields[0], fields[1], atol=8.0)  # um; the tissue boxes differ by a few px


def test_a_slide_without_mpp_needs_default_mpp(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_tiff(tmp_path / "no_mpp.tif", scene(768, 1024), mpp=None)
    predictor = SMTPredictor(tiny(0.5), num_focus=K)
    with pytest.raises(SlideReadError) as error:
        predictor.predict(path)
    message = str(error.value)
    assert str(path) in message and "--default_mpp" in message and "geometry: tissue" in message
    assert "\n" not in message
    for spelling in ("--default_mpp", "--default-mpp"):  # the message's spelling works on the command line
        args = build_parser().parse_args(["predict", str(path), "-m", "m.pt", "-o", "out", spelling, "0.5"])
        assert args.default_mpp == 0.5
    stated = SMTPredictor(tiny(0.5), num_focus=K, default_mpp=0.5).predict(path)
    assert stated.mpp == 0.5 and len(stated.boxes[0]) == 2
    relative = SMTPredictor(tiny(0.5, geometry="tissue"), num_focus=K).predict(path)
    assert relative.mpp is None and len(relative.boxes[0]) == 1 and relative.read_mpp is None
    with caplog.at_level("WARNING"):
        coarse = SMTPredictor(tiny(0.25), num_focus=K, default_mpp=0.5).predict(path)
    assert coarse.read_mpp == pytest.approx(0.5)  # the scan's: layer 3 would need 0.25
    assert "coarser than the 0.25 um/px layer 3 reads" in caplog.text


@pytest.mark.parametrize("mpp", [350.0, 0.001])
def test_an_absurd_mpp_is_not_trusted(tmp_path: Path, mpp: float) -> None:
    """350 um/px is what a 72-dpi resolution tag gives (OpenSlide's small test TIFFs)."""
    path = write_tiff(tmp_path / "absurd.tif", scene(768, 1024), mpp=mpp)
    assert not plausible(mpp)
    with open_slide(path) as slide:
        with pytest.raises(SlideReadError, match=f"states {mpp:g} um/px, which no scan has"):
            scan_mpp(slide)
        assert scan_mpp(slide, default_mpp=0.5) == 0.5
        with pytest.raises(ValueError, match="default_mpp"):
            scan_mpp(slide, default_mpp=500.0)


def test_tissue_detection_uses_the_resolved_mpp_not_an_absurd_one_from_the_file(tmp_path: Path) -> None:
    """A file stating 350 um/px (a 72-dpi tag) read with --default_mpp 0.5 finds the same layer-1 fields as
    the same image whose file states 0.5: the debris filter and the section gap are sized by the resolved
    mpp, not by the file's absurd one."""
    image = scene(768, 1024)
    image[40:52, 60:72] = (150, 105, 80)  # a 6 x 6 um debris speck at 0.5 um/px: not a section
    stated = write_tiff(tmp_path / "stated.tif", image, mpp=0.5)
    absurd = write_tiff(tmp_path / "absurd.tif", image, mpp=350.0)
    scale = LayerScale.of(tiny(0.5))
    with open_slide(stated) as a, open_slide(absurd) as b:
        expected = scale.layer1_boxes(a)
        np.testing.assert_allclose(scale.layer1_boxes(b, default_mpp=0.5), expected)
        relative = LayerScale.of(tiny(0.5, "tissue"))
        np.testing.assert_allclose(relative.layer1_boxes(b, 0.5), relative.layer1_boxes(a))
        # the speck counts as tissue only when the file's 350 um/px sizes the debris filter
        assert len(tissue_components(b, 350.0)) == 2 and len(tissue_components(b, 0.5)) == 1
