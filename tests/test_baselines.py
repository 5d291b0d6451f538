"""The dense baseline: tissue tiling, the ResNet-18 + attention-MIL network, training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_cohort

from smt_monai.baselines import DenseEvaluator, DenseMIL, DenseTrainer, predict_dense, tile_tissue
from smt_monai.data import load_datalist, open_slide


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
    with torch.no_grad():
        features = net.encode(torch.randn(5, 3, 64, 64))
        logits, attention = net.pool(features)
    assert features.shape == (5, 512) and logits.shape == (1, 3)
    assert torch.isclose(attention.sum(), torch.tensor(1.0))
    with torch.no_grad():
        assert net(torch.randn(3, 3, 32, 32)).shape == (1, 3)


def test_predict_dense_encodes_every_tissue_tile(tiny_slide: Path) -> None:
    net = DenseMIL().eval()
    with open_slide(tiny_slide) as slide:
        result = predict_dense(net, slide, 64, chunk_size=8)
        expected = len(tile_tissue(slide, 64))
    assert result["tiles"] == expected
    assert result["probs"].shape == (2,) and np.isclose(result["probs"].sum(), 1.0, atol=1e-5)


def test_train_and_evaluate_write_model_and_metrics(tmp_path: Path) -> None:
    datalist = write_cohort(tmp_path / "data", count=4, side=1024, splits=(2, 1, 1))
    train = load_datalist(datalist, "training", str(datalist.parent))
    log = DenseTrainer(DenseMIL(), train, tmp_path / "run", tile_size=32, max_epochs=1, bag_size=4).run()
    assert (tmp_path / "run" / "model.pt").exists() and len(log["epochs"]) == 1
    test = load_datalist(datalist, "testing", str(datalist.parent))
    model = tmp_path / "run" / "model.pt"
    metrics = DenseEvaluator(DenseMIL(), test, tmp_path / "eval" / "metrics.json", 32, ckpt_path=model).run()
    assert metrics["num_slides"] == 1
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_slides"] == 1


def test_train_with_bfloat16_autocast_updates_the_network(tmp_path: Path) -> None:
    datalist = write_cohort(tmp_path / "data", count=2, side=1024, splits=(2, 0, 0))
    train = load_datalist(datalist, "training", str(datalist.parent))
    net = DenseMIL()
    before = [p.detach().clone() for p in net.parameters()]
    log = DenseTrainer(net, train, tmp_path / "run", tile_size=32, max_epochs=1, bag_size=4, amp=True).run()
    assert np.isfinite(log["epochs"][0]["loss"])
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_guided_bags_hold_tumour_tiles_of_annotated_positive_slides(tmp_path: Path) -> None:
    datalist = write_cohort(tmp_path / "data", count=2, side=1024, splits=(2, 0, 0))
    negative, positive = load_datalist(datalist, "training", str(datalist.parent))
    assert (negative["label"], positive["label"]) == (0, 1)
    boxes = np.array([[x, y, 32.0] for y in range(0, 1024, 32) for x in range(0, 1024, 32)])
    entries = [negative, positive]
    trainer = DenseTrainer(DenseMIL(), entries, tmp_path / "r", tile_size=32, bag_size=16, guide=1.0)
    tumour = trainer._tumour_tiles(positive, boxes)
    # conftest's tumour square is 102 px wide from (409, 409): 4 x 4 tiles touch it, the corner one by 5 %
    assert len(tumour) == 15
    for _ in range(5):
        pick = trainer._pick(positive, boxes)
        assert len(pick) == 16 == len(set(pick.tolist()))
        assert np.isin(pick, tumour).sum() >= 4
    assert len(trainer._tumour_tiles(negative, boxes)) == 0
    unguided = DenseTrainer(DenseMIL(), [positive], tmp_path / "run2", tile_size=32, bag_size=16, guide=0.0)
    hits = [np.isin(unguided._pick(positive, boxes), tumour).sum() for _ in range(20)]
    assert np.mean(hits) < 2  # random bags: 16 of 1024 tiles, about 0.4 tumour tiles each
    with pytest.raises(ValueError, match="guide"):
        DenseTrainer(DenseMIL(), [positive], tmp_path / "run3", guide=1.5)
