"""``smt-monai benchmark focus-diagnostic``: where each layer's picks land, against random picks, on tiny
annotated slides (a tumour square and a mimic square), with a hand-built rule that focuses on dark patches
and with a saved model through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, write_cohort

from smt_monai.benchmark.focus_diagnostic import CATEGORIES, focus_landing, hit_probability
from smt_monai.cli import main
from smt_monai.data import load_datalist
from smt_monai.data.annotations import polygon_feature
from smt_monai.inference import ModelCard, SMTPredictor, save_model
from smt_monai.networks import SMT
from smt_monai.networks.layer import LayerOutput

SIDE = 1024


@pytest.fixture(scope="module")
def datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four tiny slides (two with a dark annotated tumour square), each with a pale annotated mimic."""
    folder = tmp_path_factory.mktemp("landing")
    path = write_cohort(folder, count=4, side=SIDE, splits=(0, 0, 4))
    low, high = 0.62 * SIDE, 0.72 * SIDE
    mimic = polygon_feature(
        np.array([[low, low], [high, low], [high, high], [low, high]]), "Mimic", (0, 150, 200)
    )
    for geojson in folder.glob("*.geojson"):
        content = json.loads(geojson.read_text())
        content["features"].append(mimic)
        geojson.write_text(json.dumps(content))
    return path


class DarkPatches(torch.nn.Module):
    """A focusing rule in a layer's place: ``q`` is how dark each patch is; nothing else is learnt."""

    def __init__(self, grid: int) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> LayerOutput:
        darkness = torch.nn.functional.adaptive_avg_pool2d(x.mean(1), self.grid).flatten(1)  # optical density
        tokens = 1 + self.grid**2
        attn = torch.full((len(x), 1, tokens, tokens), 1.0 / tokens)
        logits = torch.zeros(len(x), 2)
        embeddings = torch.zeros(len(x), self.grid**2, 2)
        return LayerOutput(logits, logits.softmax(1), logits, embeddings, torch.sigmoid(4 * darkness), attn)


def test_a_rule_that_focuses_on_dark_patches_lands_on_tumour_more_than_chance(datalist: Path) -> None:
    torch.manual_seed(0)
    network = SMT(preset="tiny", grid=TINY_OVERRIDES["grid"], patch_size=TINY_OVERRIDES["patch_size"]).eval()
    network.layer1, network.layer2 = DarkPatches(network.grid), DarkPatches(network.grid)
    predictor = SMTPredictor(network, num_focus=2, num_workers=1)
    result = focus_landing(predictor, load_datalist(datalist, "testing", str(datalist.parent)))
    assert result["num_focus"] == 2 and len(result["slides"]) == 4
    for slide in result["slides"]:
        for layer in ("layer1", "layer2"):
            for who in ("model", "random"):
                assert sum(slide[layer][who].values()) == pytest.approx(1.0)
                assert slide[layer][who]["glass"] == 0.0  # tissue first, and every region holds enough
            if slide["label"] == 0:
                assert slide[layer]["model"]["tumour"] == slide[layer]["random"]["tumour"] == 0.0
    positive = result["summary"]["positive"]
    assert positive["slides"] == 2 and set(positive["layer1"]["model"]) == set(CATEGORIES)
    for layer in ("layer1", "layer2"):
        assert positive[layer]["model"]["tumour"] >= 0.5 > positive[layer]["random"]["tumour"] > 0
    assert result["summary"]["negative"]["layer1"]["random"]["mimic"] > 0
    hit = positive["layer1_hit"]
    assert hit["model"] == 1.0 and 0 < hit["random"] < hit["mimic_blind"] <= 1.0
    assert result["summary"]["negative"]["layer1_hit"] == {"model": 0.0, "random": 0.0, "mimic_blind": 0.0}


def test_hit_probability_counts_draws_without_repetition() -> None:
    assert hit_probability(1, 3, 2) == pytest.approx(0.5)  # 1 - C(3, 2) / C(4, 2)
    assert hit_probability(1, 11, 4) == pytest.approx(1 / 3)  # one tumour patch among 11 mimic patches
    assert hit_probability(2, 2, 4) == hit_probability(1, 0, 4) == 1.0  # every suspicious patch is read
    assert hit_probability(0, 5, 2) == 0.0


def test_the_command_prints_and_writes_the_landing_of_a_saved_model(
    datalist: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    torch.manual_seed(0)
    network = SMT(preset="tiny", grid=TINY_OVERRIDES["grid"], patch_size=TINY_OVERRIDES["patch_size"])
    model = save_model(
        network, ModelCard.for_training(network, "tiny", ["benign", "tumour"]), tmp_path / "m.pt"
    )
    out = tmp_path / "landing.json"
    args = ["benchmark", "focus-diagnostic", "--model", str(model), "--datalist", str(datalist)]
    assert main([*args, "--num-focus", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "positive slides (2), K = 2" in printed and "| 1 | random |" in printed
    assert "layer 1 picked a tumour patch on " in printed and "cannot tell tumour from mimic" in printed
    result = json.loads(out.read_text())
    assert result["model"] == str(model) and result["split"] == "testing"
    assert result["summary"]["all"]["slides"] == 4 and result["label_overlap"] == [0.01, 0.1]
