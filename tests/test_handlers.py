"""Handlers on bare Ignite engines: staged activation, loss-weight ramp, score-bank persistence (a crafted
file refused), metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from PIL import Image

from smt_monai.engines.focus_outcome import FocusOutcome
from smt_monai.focus import ScoreBank
from smt_monai.handlers import (
    BalancedAccuracy,
    CheckpointError,
    FocusRate,
    LossWeightRamp,
    MetricsJSONWriter,
    QuadraticKappa,
    ScoreBankPersistence,
    SlideAUC,
    StagedLayerActivation,
)
from smt_monai.handlers.metrics import balanced_accuracy, concordance_index, quadratic_weighted_kappa


def _record(engine: Engine, *names: str) -> list:
    seen: list = []
    engine.add_event_handler(
        Events.EPOCH_STARTED, lambda e: seen.append(tuple(getattr(e.state, n) for n in names))
    )
    return seen


def test_staged_activation_and_ramp_follow_the_epoch() -> None:
    engine = Engine(lambda e, b: None)
    StagedLayerActivation(start_epoch=[1, 3, 5]).attach(engine)
    LossWeightRamp(start_epoch=[1, 3, 5], ramp_epochs=2, fwd_max=1.0, bwd_max=0.1).attach(engine)
    seen = _record(engine, "num_layers", "lambda_fwd", "lambda_bwd")
    engine.run([0], max_epochs=6)
    assert [s[0] for s in seen] == [1, 1, 2, 2, 3, 3]
    assert seen[0][1] == pytest.approx([0.5, 0.0, 0.0])
    assert seen[2][1] == pytest.approx([1.0, 0.5, 0.0]) and seen[2][2] == pytest.approx([0.05, 0.0])
    assert seen[5][1] == pytest.approx([1.0, 1.0, 1.0]) and seen[5][2] == pytest.approx([0.1, 0.1])


def test_schedule_arguments_are_validated() -> None:
    with pytest.raises(ValueError):
        StagedLayerActivation(start_epoch=[2, 3, 4])
    with pytest.raises(ValueError):
        StagedLayerActivation(start_epoch=[1, 5, 3])
    with pytest.raises(ValueError):
        LossWeightRamp(ramp_epochs=-1)


def test_score_bank_is_saved_each_epoch_and_restored_on_resume(tmp_path: Path) -> None:
    bank = ScoreBank(eps=0.5)
    engine = Engine(lambda e, b: bank.update([f"slide@{e.state.epoch}"], torch.ones(1, 4)))
    ScoreBankPersistence(bank, tmp_path / "bank.pt").attach(engine)
    engine.run([0], max_epochs=2)
    restored = ScoreBank(eps=0.5)
    fresh = Engine(lambda e, b: None)
    ScoreBankPersistence(restored, tmp_path / "bank.pt", resume=True).attach(fresh)
    fresh.run([0], max_epochs=1)
    assert len(restored) == 2
    torch.testing.assert_close(restored.get(["slide@2"]), bank.get(["slide@2"]))
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind


class _Payload:
    """A pickle that creates a file when unpickled: what a crafted ``score_bank.pt`` could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_crafted_score_bank_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    torch.save({"keys": ["x"], "scores": _Payload(marker)}, tmp_path / "score_bank.pt")
    engine = Engine(lambda e, b: None)
    ScoreBankPersistence(ScoreBank(), tmp_path / "score_bank.pt", resume=True).attach(engine)
    with pytest.raises(CheckpointError, match="score_bank.pt: refused: it holds Python objects") as info:
        engine.run([0])
    assert not marker.exists()
    assert "\n" not in str(info.value)


def test_score_bank_of_the_wrong_shape_is_named(tmp_path: Path) -> None:
    torch.save({"keys": ["x", "y"], "scores": torch.ones(3, 4)}, tmp_path / "score_bank.pt")
    engine = Engine(lambda e, b: None)
    ScoreBankPersistence(ScoreBank(), tmp_path / "score_bank.pt", resume=True).attach(engine)
    with pytest.raises(
        CheckpointError, match=r"score_bank.pt: not a score bank \(2 keys but scores of shape"
    ):
        engine.run([0])


def test_bank_merge_unites_keys() -> None:
    a, b = ScoreBank(), ScoreBank()
    a.update(["x", "y"], torch.ones(2, 4))
    b.update(["y", "z"], torch.full((2, 4), 3.0))
    a.merge_state_dict(b.state_dict())
    assert len(a) == 3
    torch.testing.assert_close(a.get(["y"]), b.get(["y"]))


def test_metric_functions_by_hand() -> None:
    labels = np.array([0, 0, 0, 1])
    assert balanced_accuracy(labels, np.array([0, 0, 1, 1])) == pytest.approx((2 / 3 + 1) / 2)
    assert quadratic_weighted_kappa(np.array([0, 1, 2]), np.array([0, 1, 2]), 3) == pytest.approx(1.0)
    assert quadratic_weighted_kappa(np.array([0, 2]), np.array([2, 0]), 3) < 0


def test_concordance_index_by_hand() -> None:
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 1, 0, 1])
    # comparable pairs: (0,1) (0,2) (0,3) (1,2) (1,3); slide 2 censored, so (2,3) is not
    assert concordance_index(time, event, np.array([4.0, 3.0, 2.0, 1.0])) == 1.0
    assert concordance_index(time, event, np.array([1.0, 2.0, 3.0, 4.0])) == 0.0
    assert concordance_index(time, event, np.ones(4)) == 0.5
    assert concordance_index(time, event, np.array([4.0, 1.0, 2.0, 3.0])) == pytest.approx(3 / 5)
    assert np.isnan(concordance_index(time, np.zeros(4), np.ones(4)))


def test_grading_metrics_recall_confusion_kappa_concordance_and_their_picture(tmp_path: Path) -> None:
    """Four graded slides through an engine: per-class recall, the confusion matrix in metrics.json and as a
    PNG and a TensorBoard figure, the concordance of the expected grade with survival."""
    from smt_monai.handlers import ClassRecall, ConcordanceIndex, ConfusionMatrix, ConfusionMatrixWriter

    names = ["benign", "grade 1", "grade 2"]
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.0, 0.2, 0.8]])
    batch = {
        "label": np.array([0, 1, 2, 2]),
        "layer_probs": probs[:, None],
        "focus": _focus(hit=[np.nan] * 4),
        "seconds": np.ones(4),
        "survival": np.array([[9.0, 0, np.nan], [5.0, 1, np.nan], [4.0, 1, np.nan], [1.0, 1, np.nan]]),
    }
    engine = Engine(lambda e, b: b)
    QuadraticKappa().attach(engine, "quadratic_kappa")
    ClassRecall(names).attach(engine, "recall")
    ConfusionMatrix().attach(engine, "confusion_matrix")
    ConcordanceIndex().attach(engine, "concordance_index")
    MetricsJSONWriter(tmp_path / "metrics.json").attach(engine)
    ConfusionMatrixWriter(tmp_path / "confusion_matrix.png", names, log_dir=tmp_path / "tb").attach(engine)
    engine.run([batch])
    engine.run([batch])  # a second evaluation adds to the same event file
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert (metrics["recall_benign"], metrics["recall_grade 1"], metrics["recall_grade 2"]) == (1.0, 1.0, 0.5)
    assert "recall" not in metrics
    assert metrics["quadratic_kappa"] == pytest.approx(
        quadratic_weighted_kappa(batch["label"], np.array([0, 1, 1, 2]), 3)
    )
    assert metrics["concordance_index"] == 1.0  # expected grade 0.3 < 0.9 < 1.2 < 1.8 as time shortens
    inverse_risk = np.c_[batch["survival"][:, :2], -np.arange(4)]  # the longest survivor at the highest risk
    mixed = ConcordanceIndex()
    mixed.update((batch["label"], batch["layer_probs"], batch["focus"], batch["survival"]))
    mixed.update((batch["label"], batch["layer_probs"], batch["focus"], inverse_risk))
    assert mixed.compute() == 1.0  # some slides without a predicted risk: the expected grade for all
    ranked = ConcordanceIndex()
    ranked.update((batch["label"], batch["layer_probs"], batch["focus"], inverse_risk))
    assert ranked.compute() == 0.0  # a risk head's output ranks the slides
    assert Image.open(tmp_path / "confusion_matrix.png").size[0] > 200
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1


def _focus(**columns: list[float]) -> dict[str, np.ndarray]:
    """The evaluator's ``focus`` output: the given measures, NaN (not applicable) for the others."""
    count = len(next(iter(columns.values()))) if columns else 6
    return {name: np.array(columns.get(name, [np.nan] * count)) for name in FocusOutcome._fields}


def test_metrics_on_an_engine_and_metrics_json(tmp_path: Path) -> None:
    batches = [
        {
            "label": np.array([1, 0]),
            "layer_probs": np.array([[[0.6, 0.4], [0.2, 0.8]], [[0.4, 0.6], [0.9, 0.1]]]),
            "focus": _focus(
                hit=[1.0, np.nan], top1=[0.0, np.nan], regions=[0.25, np.nan], hit_chance=[0.5, np.nan]
            ),
            "seconds": np.array([0.5, 1.5]),
        },
        {
            "label": np.array([1]),
            "layer_probs": np.array([[[0.7, 0.3], [0.3, 0.7]]]),
            "focus": _focus(hit=[1.0], top1=[1.0], regions=[0.75], hit_chance=[0.3]),
            "seconds": np.array([1.0]),
        },
    ]
    engine = Engine(lambda e, b: b)
    BalancedAccuracy().attach(engine, "balanced_accuracy")
    BalancedAccuracy(layer=0).attach(engine, "balanced_accuracy_layer1")
    SlideAUC().attach(engine, "auc")
    QuadraticKappa().attach(engine, "kappa")
    FocusRate("hit").attach(engine, "focus_hit_rate")
    FocusRate("hit", chance=True).attach(engine, "focus_hit_rate_chance")
    FocusRate("top1").attach(engine, "focus_top1")
    FocusRate("regions").attach(engine, "focus_region_precision")
    MetricsJSONWriter(tmp_path / "out" / "metrics.json").attach(engine)
    engine.run(batches)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["balanced_accuracy"] == pytest.approx(1.0)
    # layer 1 gets every slide wrong
    assert metrics["balanced_accuracy_layer1"] == pytest.approx(0.0)
    assert metrics["auc"] == pytest.approx(1.0)
    assert metrics["focus_hit_rate"] == pytest.approx(1.0)
    assert metrics["focus_hit_rate_chance"] == pytest.approx(0.4)
    assert metrics["focus_top1"] == pytest.approx(0.5)
    assert metrics["focus_region_precision"] == pytest.approx(0.5)
    assert metrics["num_slides"] == 3 and metrics["seconds_per_slide"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        FocusRate("recall")


def test_the_decision_threshold_is_tuned_on_validation_and_kept() -> None:
    """A model that ranks every positive slide above every negative one but calls them all positive at 0.5:
    the validation split's threshold separates them (balanced accuracy 1 instead of 0.5)."""
    from smt_monai.handlers import BalancedAccuracy, DecisionThreshold
    from smt_monai.handlers.metrics import tuned_threshold

    labels = np.array([0, 0, 0, 1, 1, 1])
    positive = np.array([0.6, 0.7, 0.72, 0.9, 0.95, 0.97])
    assert tuned_threshold(labels, positive) == pytest.approx((0.72 + 0.9) / 2)
    output = {
        "label": labels,
        "layer_probs": np.stack([1 - positive, positive], axis=1)[:, None],
        "focus": _focus(),
    }
    results = {}
    for name, metric in (
        ("fixed", BalancedAccuracy()),
        ("tuned", BalancedAccuracy(threshold="tuned")),
        ("threshold", DecisionThreshold()),
        ("kept", BalancedAccuracy(threshold=0.8)),
    ):
        metric.reset()
        metric.update((output["label"], output["layer_probs"], output["focus"]))
        results[name] = metric.compute()
    assert results["fixed"] == 0.5 and results["tuned"] == 1.0 and results["kept"] == 1.0
    assert results["threshold"] == pytest.approx(0.81)
    with pytest.raises(ValueError, match="threshold"):
        BalancedAccuracy(threshold=1.5)


@pytest.mark.parametrize("threshold", [0.5, 0.8, "tuned"])
def test_recall_and_confusion_matrix_decide_at_the_threshold_balanced_accuracy_uses(threshold) -> None:
    """The confusion matrix and the recalls in metrics.json count the decisions balanced accuracy scores: at
    the model's threshold, not at 0.5 beside it."""
    from smt_monai.handlers import BalancedAccuracy, ClassRecall, ConfusionMatrix

    labels = np.array([0, 0, 0, 1, 1, 1])
    positive = np.array([0.6, 0.7, 0.72, 0.9, 0.95, 0.97])
    update = (labels, np.stack([1 - positive, positive], axis=1)[:, None], _focus())
    results = {}
    for name, metric in (
        ("accuracy", BalancedAccuracy(threshold=threshold)),
        ("recall", ClassRecall(["normal", "tumour"], threshold=threshold)),
        ("matrix", ConfusionMatrix(threshold=threshold)),
    ):
        metric.reset()
        metric.update(update)
        results[name] = metric.compute()
    benign_called_tumour = 3 if threshold == 0.5 else 0
    assert results["matrix"] == [[3 - benign_called_tumour, benign_called_tumour], [0, 3]]
    assert results["recall"] == {"recall_normal": 1 - benign_called_tumour / 3, "recall_tumour": 1.0}
    assert results["accuracy"] == (results["recall"]["recall_normal"] + 1.0) / 2


def test_lesion_recall_counts_the_slides_found_in_each_size_bin() -> None:
    """Positive slides binned by their largest lesion (a size on an edge in the lower bin), each bin's recall
    at the threshold and its slide count; negative slides and sizes unknown (NaN) count nowhere, an empty bin
    has recall NaN. Edges must be increasing positive sizes."""
    from smt_monai.handlers import LesionRecall
    from smt_monai.handlers.metrics import lesion_bins

    labels = np.array([1, 1, 1, 1, 1, 0, 1])
    positive = np.array([0.2, 0.9, 0.7, 0.95, 0.3, 0.99, 0.1])
    size = np.array([0.1, 0.2, 1.5, 1.9, 1.0, np.nan, np.nan])
    metric = LesionRecall(threshold=0.5)
    metric.update((labels, np.stack([1 - positive, positive], axis=1)[:, None], _focus(), size))
    assert metric.compute() == pytest.approx(
        {
            "recall_lesion_up_to_0.2mm": 0.5,  # 0.1 mm missed, 0.2 mm (on the edge) found
            "slides_lesion_up_to_0.2mm": 2.0,
            "recall_lesion_0.2_to_2mm": 2 / 3,  # 1.5 and 1.9 mm found, 1.0 mm missed
            "slides_lesion_0.2_to_2mm": 3.0,
            "recall_lesion_over_2mm": np.nan,
            "slides_lesion_over_2mm": 0.0,
        },
        nan_ok=True,
    )
    assert lesion_bins([0.3, 0.5, 1.0]) == ["up_to_0.3mm", "0.3_to_0.5mm", "0.5_to_1mm", "over_1mm"]
    for edges in ([], [2.0, 0.2], [0.0, 1.0]):
        with pytest.raises(ValueError, match="edges_mm"):
            LesionRecall(edges)
