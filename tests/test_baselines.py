"""The dense baseline: tissue tiling, the ResNet-18 + attention-MIL network, training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import scene, write_cohort, write_tiff
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from smt_monai.baselines import (
    DenseMIL,
    DenseMILLoss,
    LoadTileBagd,
    predict_dense,
    prepare_bag_batch,
    read_tiles,
    tile_side,
    tile_tissue,
    validated_decision,
)
from smt_monai.benchmark.bundle_runs import bundle_workflow
from smt_monai.data import load_datalist, open_slide
from smt_monai.data.errors import OptionError, SlideReadError
from smt_monai.handlers.checkpoint import CheckpointError


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


@pytest.mark.parametrize("mpp", [0.5, None], ids=["mpp", "no-mpp"])
def test_pen_marks_and_debris_are_not_tiled(tmp_path: Path, mpp: float | None) -> None:
    """The dense baseline tiles the tissue SMT's fields cover: a marker stroke and a debris speck on the
    glass add no tile, so they never enter a bag or a slide's prediction."""
    image = scene(2048, 2048)  # tissue in rows 512-1535, columns 409-1638
    clean = write_tiff(tmp_path / "clean.tif", image, downsamples=(1, 4), mpp=mpp)
    image[100:300, 800:900] = (60, 100, 200)  # blue ink
    image[1800:1860, 1850:1910] = (150, 105, 80)  # brown debris
    marked = write_tiff(tmp_path / "marked.tif", image, downsamples=(1, 4), mpp=mpp)
    with open_slide(clean) as a, open_slide(marked) as b:
        expected = tile_tissue(a, 64, mpp)
        assert len(expected) > 0 and expected[:, 1].min() >= 448 and expected[:, 1].max() < 1536
        np.testing.assert_array_equal(tile_tissue(b, 64, mpp), expected)


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
    """MONAI's SupervisedTrainer trains on random bags, the tile head on annotated tile classes; with
    val_interval, model.pt is the epoch of the best validation metric and the last epoch is model_last.pt;
    the evaluator writes SMT's metrics.json, by attention pooling or by the tile head's max."""
    datalist = write_cohort(tmp_path / "data", count=4, side=1024, splits=(2, 1, 1))
    settings = {"patch_size": 32, "max_epochs": 2, "bag_size": 4, "guide": 1.0, "tile_weight": 1.0}
    run = tmp_path / "run"
    flow = bundle_workflow(
        "train_dense.yaml",
        "training",
        {
            "dataset_dir": str(datalist.parent),
            "output_dir": str(run),
            "val_interval": 1,
            "best_metric": "quadratic_kappa",
            **settings,
        },
    )
    network = flow.parser.get_parsed_content("network")
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    flow.run()
    changed = {name for name, p in network.named_parameters() if not torch.equal(before[name], p)}
    assert {"tile_head.weight", "pooling.classifier.weight"} <= changed
    assert any(name.startswith("encoder.") for name in changed)
    best = torch.load(run / "model.pt", weights_only=True)
    assert best["best_epoch"] in (1, 2)
    assert best["best_metric"] == best["metrics"]["quadratic_kappa"]
    assert "balanced_accuracy" in best["metrics"]
    assert best["aggregation"] == "attention" and 0 <= best["metrics"]["decision_threshold"] <= 1
    last = torch.load(run / "model_last.pt", weights_only=True)  # MONAI's CheckpointSaver: the state dict
    assert all(torch.equal(last[k], v) for k, v in network.state_dict().items())
    tags = EventAccumulator(str(run)).Reload().Tags()["scalars"]
    assert "train_loss" in tags and "quadratic_kappa" in tags
    overrides = {
        "datalist": str(datalist),
        "ckpt_path": str(run / "model.pt"),
        "output_dir": str(tmp_path / "eval"),
    }
    for aggregation in ("attention", "max"):
        evaluation = {**overrides, **settings, "tile_mpp": 1.0, "aggregation": aggregation}
        flow = bundle_workflow("evaluate_dense.yaml", "evaluating", evaluation)
        # the validated threshold holds for the aggregation it was chosen with only
        kept = best["metrics"]["decision_threshold"] if aggregation == "attention" else 0.5
        assert flow.parser.get_parsed_content("threshold") == pytest.approx(kept)
        flow.run()
        metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
        assert metrics["num_slides"] == 1 and metrics["seconds_per_slide"] > 0
        assert "balanced_accuracy" in metrics and "decision_threshold" in metrics
        assert metrics["slides_lesion_up_to_0.2mm"] == 1  # the positive testing slide, 0.07 mm across
    default = bundle_workflow("evaluate_dense.yaml", "evaluating", {**overrides, **settings})
    assert default.parser.get_parsed_content("aggregation") == "attention"  # the model's own


def test_validated_decision_is_the_models_own_for_its_aggregation(tmp_path: Path, caplog) -> None:
    """A dense model file gives the aggregation and threshold it was validated with; another aggregation is
    decided at 0.5 with a warning, a file without validation is attention at 0.5, and a bad aggregation is
    refused before the file is read."""
    model = tmp_path / "model.pt"
    torch.save({"model": {}, "best_metric": 1.0, "best_epoch": 3, "metrics": {"decision_threshold": 0.8},
                "aggregation": "max"}, model)  # fmt: skip
    assert validated_decision(str(model)) == ("max", 0.8)
    assert validated_decision(str(model), "max") == ("max", 0.8)
    with caplog.at_level("WARNING"):
        assert validated_decision(str(model), "attention") == ("attention", 0.5)
    assert "validated with max aggregation; evaluating by attention at 0.5" in caplog.text
    bare = tmp_path / "last.pt"
    torch.save(DenseMIL().state_dict(), bare)
    assert validated_decision(str(bare)) == ("attention", 0.5)
    with pytest.raises(OptionError, match="dense aggregation must be one of"):
        validated_decision(str(tmp_path / "missing.pt"), "mean")
    with pytest.raises(CheckpointError, match="missing.pt"):
        validated_decision(str(tmp_path / "missing.pt"))


def test_training_without_validation_keeps_the_last_epoch(tmp_path: Path) -> None:
    """val_interval 0 (the default) trains on a datalist without a validation split; model.pt is the last
    epoch's network."""
    datalist = write_cohort(tmp_path / "data", count=2, side=1024, splits=(2, 0, 0))
    content = json.loads(datalist.read_text())
    datalist.write_text(json.dumps({"training": content["training"]}))
    run = tmp_path / "run"
    settings = {"patch_size": 32, "max_epochs": 1, "bag_size": 4}
    flow = bundle_workflow(
        "train_dense.yaml",
        "training",
        {"dataset_dir": str(datalist.parent), "output_dir": str(run), **settings},
    )
    flow.run()
    network = flow.parser.get_parsed_content("network")
    saved = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in network.state_dict().items())
    assert not (run / "model_last.pt").exists()


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


def test_tile_labels_follow_graded_annotations_and_guide_to_the_slide_grade(tmp_path: Path) -> None:
    """A graded slide's tiles take the highest class they overlap, never above the slide's; guided bags hold
    tiles of the slide's own grade (the tiles that make its label)."""
    slide = write_tiff(tmp_path / "graded.tif", scene(1024, 1024))

    def square(x0: int, side: int, name: str) -> dict:
        ring = [[x0, x0], [x0 + side, x0], [x0 + side, x0 + side], [x0, x0 + side], [x0, x0]]
        kind = {"objectType": "annotation", "classification": {"name": name}}
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": kind}

    annotation = tmp_path / "graded.geojson"
    features = [square(256, 256, "grade 1"), square(384, 64, "grade 2")]  # a grade-2 focus inside grade 1
    annotation.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    names = ["benign", "grade 1", "grade 2"]
    bags = LoadTileBagd(tile_size=64, bag_size=16, guide=1.0, class_names=names, seed=0)
    entry = {"image": str(slide), "label": 2, "annotation": str(annotation)}
    tiles = bags.tiles(str(slide))
    labels = bags.tile_labels(entry, str(slide))
    centres = tiles[:, :2] + 32
    inside = lambda x0, side: np.all((centres >= x0) & (centres < x0 + side), axis=1)  # noqa: E731
    assert np.all(labels[inside(384, 64)] == 2) and inside(384, 64).sum() == 1
    assert np.all(labels[inside(256, 256) & ~inside(384, 64)] == 1)
    assert np.all(labels[~inside(256, 256)] == 0)
    np.testing.assert_array_equal(bags.tumour_tiles(entry, str(slide)), np.flatnonzero(labels == 2))
    bag = bags(entry)
    assert bag["image"].shape == (16, 3, 64, 64) and (bag["tile_label"] == 2).sum() == 1
    # the same annotation on a grade-1 slide labels no tile above 1; a slide's class caps its tiles
    capped = LoadTileBagd(tile_size=64, class_names=names).tile_labels({**entry, "label": 1}, str(slide))
    np.testing.assert_array_equal(capped, np.minimum(labels, 1))
    # the tumour names alone do not read graded polygons: no guided tile, no tile class
    assert len(LoadTileBagd(tile_size=64, guide=1.0).tumour_tiles(entry, str(slide))) == 0
    # without annotation a positive slide's tiles are unknown (-1), a negative slide's are benign
    unannotated = LoadTileBagd(tile_size=64, class_names=names)
    assert np.all(unannotated.tile_labels({"image": str(slide), "label": 2}, str(slide)) == -1)
    negative = LoadTileBagd(tile_size=64, class_names=names)
    assert np.all(negative.tile_labels({**entry, "label": 0}, str(slide)) == 0)


def test_tile_loss_trains_the_tile_head_on_known_tiles_only() -> None:
    torch.manual_seed(0)
    net = DenseMIL(num_classes=3).train()
    bags = torch.randint(0, 256, (1, 6, 3, 32, 32), dtype=torch.uint8)
    slides, tiles = net(bags, with_tiles=True)
    assert slides.shape == (1, 3) and tiles.shape == (1, 6, 3)
    labels, tile_labels = torch.tensor([2]), torch.tensor([[2, 0, 0, -1, -1, 1]])
    slide_only = torch.nn.functional.cross_entropy(slides, labels)
    torch.testing.assert_close(DenseMILLoss(0.0)((slides, tiles), (labels, tile_labels)), slide_only)
    known = tile_labels[0] >= 0
    expected = slide_only + 0.5 * torch.nn.functional.cross_entropy(tiles[0][known], tile_labels[0][known])
    loss = DenseMILLoss(0.5)((slides, tiles), (labels, tile_labels))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert net.tile_head.weight.grad is not None and net.tile_head.weight.grad.abs().sum() > 0
    unknown = torch.full_like(tile_labels, -1)  # an unannotated positive slide: the slide term alone
    torch.testing.assert_close(DenseMILLoss(0.5)((slides, tiles), (labels, unknown)), slide_only)
    batch = {"image": bags, "label": labels, "tile_label": tile_labels}
    inputs, target, args, kwargs = prepare_bag_batch(batch, "cpu")
    assert inputs is not None and target[1] is not None and args == () and kwargs == {"with_tiles": True}


def test_predict_dense_max_grades_by_the_furthest_tile(tiny_slide: Path) -> None:
    """``aggregation: max`` is SMT's rule over the tile head: P(slide >= c) = max_t P(tile t >= c)."""
    torch.manual_seed(0)
    net = DenseMIL(num_classes=3).eval()
    with open_slide(tiny_slide) as slide:
        boxes = tile_tissue(slide, 64)
        result = predict_dense(net, slide, 64, aggregation="max")
        tiles = torch.cat(list(read_tiles(slide, boxes, 64)))
    with torch.no_grad():
        probs = torch.softmax(net.tile_head(net.encode(tiles)), dim=1).numpy()
    at_least = probs[:, ::-1].cumsum(axis=1)[:, ::-1].max(axis=0)
    np.testing.assert_allclose(result["probs"], at_least - np.append(at_least[1:], 0.0), atol=1e-5)
    with pytest.raises(ValueError, match="aggregation"):
        predict_dense(net, slide, 64, aggregation="mean")
