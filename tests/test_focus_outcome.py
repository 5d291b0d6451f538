"""Focus measures and their chance levels: the exact random-pick formulas against enumeration, and a real
tiny slide through the predictor against a seeded Monte Carlo of random picks."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, write_cohort

from smt_monai.data.annotations import TumourAnnotation
from smt_monai.engines.focus_outcome import (
    TUMOUR,
    SlidePatches,
    focus_outcome,
    pick_probability,
    random_pick_product,
)
from smt_monai.focus.selection import reaches_overlap
from smt_monai.inference import SMTPredictor
from smt_monai.networks import SMT


def random_subsets(valid: np.ndarray, k: int) -> list[tuple[int, ...]]:
    """Every equally likely pick of ``k`` patches of one row, valid patches first."""
    inside, outside = np.flatnonzero(valid), np.flatnonzero(~valid)
    if len(inside) >= k:
        return list(itertools.combinations(inside, k))
    return [tuple(inside) + rest for rest in itertools.combinations(outside, k - len(inside))]


@pytest.mark.parametrize("valid_count", [7, 3, 1])
def test_random_picks_by_enumeration(valid_count: int) -> None:
    rng = np.random.default_rng(valid_count)
    k, n = 4, 9
    values = rng.random((5, n))
    valid = np.zeros((5, n), dtype=bool)
    for row in valid:
        row[rng.permutation(n)[:valid_count]] = True
    probability = pick_probability(valid, k)
    product = random_pick_product(values, valid, k)
    for r in range(5):
        subsets = random_subsets(valid[r], k)
        picked = np.zeros(n)
        for subset in subsets:
            picked[list(subset)] += 1 / len(subsets)
        np.testing.assert_allclose(probability[r], picked)
        expected = np.mean([np.prod(values[r, list(s)]) for s in subsets])
        assert product[r] == pytest.approx(expected)
    np.testing.assert_allclose(probability.sum(axis=1), k)


@pytest.fixture(scope="module")
def positive_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny positive slide (a dark square of annotated tumour) and its GeoJSON."""
    folder = tmp_path_factory.mktemp("focus")
    write_cohort(folder, count=2, splits=(0, 0, 2))
    return folder / "slide_1.tif", folder / "slide_1.geojson"


def monte_carlo(patches: SlidePatches, k: int, threshold: float, draws: int = 4000) -> tuple[float, float]:
    """Hit rate and region precision of ``draws`` seeded cascades of random tissue-first picks."""
    rng = np.random.default_rng(0)
    on = reaches_overlap(patches.overlap[TUMOUR][1], threshold)

    def pick(valid: np.ndarray) -> np.ndarray:
        inside, outside = rng.permutation(np.flatnonzero(valid)), rng.permutation(np.flatnonzero(~valid))
        return np.concatenate([inside, outside])[:k]

    hits, shares = [], []
    for _ in range(draws):
        first = pick(patches.tissue[0])
        found = np.concatenate([on[p, pick(patches.tissue[1][p])] for p in first])
        hits.append(found.any())
        shares.append(found.mean())
    return float(np.mean(hits)), float(np.mean(shares))


def test_focus_measures_and_chance_on_a_real_slide(positive_slide: tuple[Path, Path]) -> None:
    image, geojson = positive_slide
    torch.manual_seed(0)
    network = SMT(preset="tiny", grid=TINY_OVERRIDES["grid"], patch_size=TINY_OVERRIDES["patch_size"])
    k, threshold = 2, 0.1
    predictor = SMTPredictor(network.eval(), num_focus=k, num_workers=1)
    prediction = predictor.predict(image)
    annotation = TumourAnnotation.from_file(geojson)
    grid = network.grid
    patches = SlidePatches.of(prediction.fields, prediction.boxes[0], grid, {TUMOUR: annotation})
    fields = len(prediction.boxes[0])
    assert patches.tissue[0].shape == (fields * grid**2,) and patches.tissue[1].shape == (
        fields * grid**2,
        grid**2,
    )
    assert 0 < patches.tissue[1].sum() < patches.tissue[1].size  # the slide has tissue and glass
    # every pick is found where it lies, with its box
    second, third = patches.locate(prediction)
    np.testing.assert_allclose(patches.boxes[0][second], prediction.boxes[1])
    np.testing.assert_allclose(patches.boxes[1][third[:, 0], third[:, 1]], prediction.boxes[2])
    # the overlaps are the annotation's
    np.testing.assert_allclose(
        patches.overlap[TUMOUR][1][third[:, 0], third[:, 1]], annotation.overlap_fraction(prediction.boxes[2])
    )
    assert patches.overlap[TUMOUR][1].max() == 1.0  # some layer-3 region lies inside the tumour

    outcome = focus_outcome(prediction, patches, k, threshold)
    on = annotation.overlap_fraction(prediction.boxes[2]) >= threshold
    top = int(np.argmax(prediction.region_probs[2][:, 1]))
    assert (outcome.hit, outcome.top1, outcome.regions) == (
        float(on.any()),
        float(on[top]),
        pytest.approx(on.mean()),
    )
    hit, share = monte_carlo(patches, k, threshold)
    assert 0 < outcome.hit_chance < 1 and 0 < outcome.regions_chance < 1
    assert outcome.hit_chance == pytest.approx(hit, abs=0.03)
    assert outcome.regions_chance == pytest.approx(share, abs=0.02)
    assert outcome.top1_chance == outcome.regions_chance
