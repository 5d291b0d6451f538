"""The dense baseline: tissue tiling, the ResNet-18 + attention-MIL network, training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import scene, write_cohort, write_tiff

from smt_monai.baselines import DenseMIL, LoadTileBagd, predict_dense, tile_side, tile_tissue
from smt_monai.benchmark.bundle_runs import bundle_workflow
from smt_monai.data import load_datalist, open_slide
from smt_monai.data.errors import SlideReadError


def test_tile_tissue_keeps_tiles_on_tissue_only(tiny_slide: Path) -> None:
    with open_slide(tiny_slide) as slide:
        boxes = tile_tissue(slide, 64)
    # conftest's scene: tissue spans x 20-80 %, y 25-75 % of a 1024 x 768 slide
    assert len(boxes) > 0 and np.all(boxes[:, 2] == 64)
    centres = boxes[:, :2] + 32
    assert np.all((centres[:, 0] > 0.15 * 1024) & (centres[:, 0] < 0.85 * 1024))
    assert np.all((centres[:, 1] > 0.2 * 768) & (centres[:, 1] < 0.8 * 768))
    assert len(boxes) < (1024 // 64) * (768 // 64)


def test_dense_mil_uses_the_stride_2_resnet18_and_pools_any_bag() -> None:
    net = DenseMIL(num_classes=3).eval()
    assert net.encoder.conv1.stride == (2, 2)
    tiles = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        features = net.encode(tiles)
        logits, attention = net.pool(features)
        assert features.shape == (5, 512) and logits.shape == (1, 3)
        assert torch.isclose(attention.sum(), torch.tensor(1.0))
        assert net(tiles[:3]).shape == (1, 3)
        bags = net(torch.stack([tiles[:3], tiles[2:]]))  # (B, n, 3, s, s), MONAI MILModel's input
        assert bags.shape == (2, 3)
        torch.testing.assert_close(bags[0], net(tiles[:3])[0])


def test_predict_dense_encodes_every_tissue_tile(tiny_slide: Path) -> None:
    net = DenseMIL().eval()
    with open_slide(tiny_slide) as slide:
        result = predict_dense(net, slide, 64, chunk_size=8)
        expected = len(tile_tissue(slide, 64))
    assert result["tiles"] == expected
    assert result["probs"].shape == (2,) and np.isclose(result["probs"].sum(), 1.0, atol=1e-5)


def test_tiles_at_a_fixed_mpp_cover_the_same_tissue_on_any_scanner(tmp_path: Path) -> None:
    """With ``tile_mpp``, a 40x scan and a 20x scan of one scene give tiles of the same micrometres."""
    image = scene(768, 1024)
    fine = write_tiff(tmp_path / "fine.tif", image, mpp=0.25)
    coarse_image = image.reshape(384, 2, 512, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    coarse = write_tiff(tmp_path / "coarse.tif", coarse_image, mpp=0.5)
    with open_slide(fine) as a, open_slide(coarse) as b:
        assert tile_side(a, 32, 1.0) == 128 and tile_side(b, 32, 1.0) == 64 and tile_side(a, 32) == 32
        boxes_a, boxes_b = tile_tissue(a, tile_side(a, 32, 1.0)), tile_tissue(b, tile_side(b, 32, 1.0))
        assert len(boxes_a) > 0
        np.testing.assert_allclose(boxes_a * 0.25, boxes_b * 0.5)  # the same boxes in micrometres
        net = DenseMIL().eval()
        assert predict_dense(net, a, 32, tile_mpp=1.0)["tiles"] == len(boxes_a)
    bag = LoadTileBagd(tile_size=32, bag_size=4, tile_mpp=1.0, seed=0)({"image": str(coarse), "label": 0})
    assert bag["image"].shape == (4, 3, 32, 32)
    unknown = write_tiff(tmp_path / "unknown.tif", image, mpp=None)
    with open_slide(unknown) as slide:
        with pytest.raises(SlideReadError, match="default_mpp"):
            tile_side(slide, 32, 1.0)
        assert tile_side(slide, 32, 1.0, default_mpp=0.25) == 128


@pytest.mark.slow
def test_train_and_evaluate_through_the_bundle(tmp_path: Path) -> None:
    """MONAI's SupervisedTrainer trains on random bags; the evaluator writes SMT's metrics.json."""
    datalist = write_cohort(tmp_path / "data", count=4, side=1024, splits=(2, 1, 1))
    settings = {"patch_size": 32, "max_epochs": 2, "bag_size": 4}
    run = tmp_path / "run"
    flow = bundle_workflow(
        "train_dense.yaml",
        "training",
        {"dataset_dir": str(datalist.parent), "output_dir": str(run), **settings},
    )
    network = flow.parser.get_parsed_content("network")
    before = [p.detach().clone() for p in network.parameters()]
    flow.run()
    assert any(not torch.equal(a, b) for a, b in zip(before, network.parameters()))
    assert (run / "model.pt").exists() and list(run.glob("events.out.tfevents.*"))
    overrides = {
        "datalist": str(datalist),
        "ckpt_path": str(run / "model.pt"),
        "output_dir": str(tmp_path / "eval"),
    }
    bundle_workflow("evaluate_dense.yaml", "evaluating", {**overrides, **settings, "tile_mpp": 1.0}).run()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_slides"] == 1 and metrics["seconds_per_slide"] > 0 and "balanced_accuracy" in metrics


def test_guided_bags_hold_tumour_tiles_of_annotated_positive_slides(tmp_path: Path) -> None:
    datalist = write_cohort(tmp_path / "data", count=2, side=1024, splits=(2, 0, 0))
    negative, positive = load_datalist(datalist, "training", str(datalist.parent))
    assert (negative["label"], positive["label"]) == (0, 1)
    guided = LoadTileBagd(tile_size=32, bag_size=16, guide=1.0, seed=0)
    path = str(positive["image"])
    tumour = guided.tumour_tiles(positive, path)
    # conftest's tumour square is 102 px wide from (409, 409): 4 x 4 tiles touch it, the corner one by 5 %
    assert len(tumour) == 15
    for _ in range(5):
        pick = guided.pick(positive, path)
        assert len(pick) == 16 == len(set(pick.tolist()))
        assert np.isin(pick, tumour).sum() >= 4
    bag = guided(positive)["image"]
    assert bag.shape == (16, 3, 32, 32) and bag.dtype == torch.uint8
    assert len(guided.tumour_tiles(negative, str(negative["image"]))) == 0
    unguided = LoadTileBagd(tile_size=32, bag_size=16, guide=0.0, seed=0)
    hits = [np.isin(unguided.pick(positive, path), tumour).sum() for _ in range(20)]
    tiles = len(unguided.tiles(path))
    assert np.mean(hits) < 16 * 15 / tiles + 1.5  # random bags: about 16 * 15 / tiles tumour tiles each
    with pytest.raises(ValueError, match="guide"):
        LoadTileBagd(guide=1.5)
