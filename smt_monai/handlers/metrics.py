"""Slide-level validation metrics as Ignite metrics (what peers report; method-notes "Metrics").

Each metric reads the evaluator's per-batch output: ``label`` ``(B,)`` (-1 when unknown), ``layer_probs``
``(B, layers, C)`` (each layer's own aggregated slide prediction; the last layer's is SMT's), and ``focus``,
the focus measures and their chance levels by name (``smt_monai.engines.focus_outcome.FocusOutcome``'s
fields), each ``(B,)``, NaN where they do not apply (negative or unannotated slides), and ``survival``
``(B, 3)``, each slide's survival time and event (NaN where the datalist gives none) and the risk head's
predicted risk (NaN without one), and ``lesion_mm`` ``(B,)``, the greatest dimension of a positive annotated
slide's largest lesion (NaN elsewhere).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric
from monai.metrics import compute_roc_auc

from smt_monai.cascade.prediction import predicted_classes


def balanced_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels``."""
    classes = np.unique(labels)
    if not len(classes):
        return float("nan")
    return float(np.mean([(predictions[labels == c] == c).mean() for c in classes]))


def quadratic_weighted_kappa(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights (PANDA's grading metric)."""
    observed = np.zeros((num_classes, num_classes))
    np.add.at(observed, (labels, predictions), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / max(observed.sum(), 1)
    grid = np.arange(num_classes)
    weights = (grid[:, None] - grid[None, :]) ** 2 / max((num_classes - 1) ** 2, 1)
    denominator = (weights * expected).sum()
    return float(1.0 - (weights * observed).sum() / denominator) if denominator > 0 else 1.0


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` slide counts, row = true class, column = predicted class."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance index: among the comparable pairs (the shorter time is an observed event), the
    share where the slide with the shorter time has the higher risk (ties in risk count 1/2)."""
    shorter = (time[:, None] < time[None, :]) & (event[:, None] == 1)
    if not shorter.any():
        return float("nan")
    higher = (risk[:, None] > risk[None, :]) + 0.5 * (risk[:, None] == risk[None, :])
    return float(higher[shorter].mean())


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC of the positive mass ``sum_{c>0} p_c`` against ``label > 0`` (MONAI's implementation)."""
    positive = (labels > 0).astype(np.float32)
    if positive.min() == positive.max():
        return float("nan")
    score = probs[:, 1:].sum(axis=1)
    return float(compute_roc_auc(torch.as_tensor(score), torch.as_tensor(positive)))


class _SlideMetric(Metric):
    """Accumulates the evaluator's per-slide outputs over an epoch; subclasses reduce them.

    Args:
        layer: which layer's slide prediction (-1: the last, SMT's).
        threshold: decision threshold on P(positive) of a binary model for the metrics of predicted classes,
            or ``"tuned"``: the threshold the split itself gives (:func:`tuned_threshold`; what training
            saves with the model).
    """

    required_output_keys: tuple[str, ...] = ("label", "layer_probs", "focus")

    def __init__(
        self,
        layer: int = -1,
        output_transform=lambda x: x,
        device: str | torch.device = "cpu",
        threshold: float | str = 0.5,
    ) -> None:
        if threshold != "tuned" and not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be a probability or 'tuned', got {threshold!r}")
        self.layer = layer
        self.threshold = threshold
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._labels: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []
        self._focus: list[dict[str, np.ndarray]] = []
        self._extra: dict[str, list[np.ndarray]] = {key: [] for key in self.required_output_keys[3:]}

    def update(self, output: Sequence[Any]) -> None:
        """``output``: ``(label, layer_probs, focus)`` and the per-slide arrays of any further
        ``required_output_keys`` (``survival``, ``lesion_mm``), from the evaluator's output dict."""
        labels, layer_probs, focus = np.asarray(output[0]), np.asarray(output[1]), output[2]
        known = labels >= 0
        self._labels.append(labels[known])
        self._probs.append(layer_probs[known][:, self.layer] if len(layer_probs) else np.zeros((0, 2)))
        self._focus.append(focus)
        for key, values in zip(self.required_output_keys[3:], output[3:]):
            self._extra[key].append(np.asarray(values, dtype=np.float64)[known])

    def _collected_extra(self, key: str, width: int = 0) -> np.ndarray:
        """The per-slide values of output ``key`` over the epoch (``(n, width)`` where ``width`` > 0)."""
        shape = (-1, width) if width else (-1,)
        return np.concatenate([np.zeros(0), *(v.ravel() for v in self._extra[key])]).reshape(shape)

    def _collected(self) -> tuple[np.ndarray, np.ndarray]:
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, dtype=int)
        probs = np.concatenate(self._probs) if self._probs else np.zeros((0, 2))
        return labels.astype(int), probs

    def _predicted(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Labels, predicted classes (``predicted_classes`` at ``threshold`` / argmax) and the number of
        classes."""
        labels, probs = self._collected()
        threshold = split_threshold(labels, probs) if self.threshold == "tuned" else float(self.threshold)
        return labels, predicted_classes(probs, threshold), probs.shape[1]


def tuned_threshold(labels: np.ndarray, positive: np.ndarray) -> float:
    """The decision threshold on P(positive) with the highest balanced accuracy on ``labels``: the midpoint of
    the two scores around the best split (ties: the threshold nearest 0.5), as chosen on a validation split.
    """
    scores = np.unique(positive)
    candidates = np.concatenate([[scores[0] - 1e-6], (scores[1:] + scores[:-1]) / 2, [scores[-1] + 1e-6]])
    truth = labels > 0
    accuracy = [balanced_accuracy(truth, positive >= t) for t in candidates]
    best = np.flatnonzero(np.isclose(accuracy, max(accuracy)))
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def split_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The decision threshold a split gives: :func:`tuned_threshold` for a binary model on a split holding
    both classes, else 0.5."""
    if not len(labels) or probs.shape[1] != 2 or len(np.unique(labels > 0)) < 2:
        return 0.5
    return tuned_threshold(labels, probs[:, 1])


class BalancedAccuracy(_SlideMetric):
    """Slide-level balanced accuracy of one layer's own prediction (default: the last layer, i.e. SMT's), at
    ``threshold`` (as :class:`_SlideMetric`)."""

    def compute(self) -> float:
        labels, predictions, _ = self._predicted()
        return balanced_accuracy(labels, predictions) if len(labels) else float("nan")


class DecisionThreshold(_SlideMetric):
    """The decision threshold :func:`tuned_threshold` picks on this split (0.5 for more than two classes);
    training's best epoch saves it with the model (``load_model`` reads it into the model card)."""

    def compute(self) -> float:
        return split_threshold(*self._collected())


class SlideAUC(_SlideMetric):
    """Slide-level ROC AUC of one layer's positive mass."""

    def compute(self) -> float:
        labels, probs = self._collected()
        return roc_auc(labels, probs) if len(labels) else float("nan")


class QuadraticKappa(_SlideMetric):
    """Quadratic weighted kappa of the slide grade (meaningful when ``num_classes`` > 2; ``threshold`` as
    :class:`_SlideMetric`)."""

    def compute(self) -> float:
        labels, predictions, classes = self._predicted()
        return quadratic_weighted_kappa(labels, predictions, classes) if len(labels) else float("nan")


class ClassRecall(_SlideMetric):
    """Recall of every class, as metrics ``recall_<name>`` (NaN for a class no slide has).

    Args:
        class_names: the model's class names, one per class.
        layer, threshold: as :class:`_SlideMetric`.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        layer: int = -1,
        output_transform=lambda x: x,
        threshold: float | str = 0.5,
    ) -> None:
        self.class_names = [str(n) for n in class_names]
        super().__init__(layer=layer, output_transform=output_transform, threshold=threshold)
        self._metrics_result_mode = "flatten"  # each class's recall is a metric of its own

    def compute(self) -> Mapping[str, float]:
        labels, predictions, _ = self._predicted()
        recall = {}
        for c, name in enumerate(self.class_names):
            members = labels == c
            hits = predictions[members] == c
            recall[f"recall_{name}"] = float(hits.mean()) if members.any() else math.nan
        return recall


class ConfusionMatrix(_SlideMetric):
    """``(C, C)`` slide counts as nested lists (row: true class, column: predicted at ``threshold``, as
    :class:`_SlideMetric`), for metrics.json and
    :class:`~smt_monai.handlers.reporting.ConfusionMatrixWriter`."""

    def compute(self) -> list[list[int]]:
        return confusion_matrix(*self._predicted()).tolist()


class ConcordanceIndex(_SlideMetric):
    """Harrell's concordance index of the predicted risk against survival (prognosis), over the slides whose
    datalist entry gives ``time`` and ``event`` (NaN without them): the risk head's output where the model
    has one (``SMTConfig.risk_head``, trained by the Cox partial likelihood), else the expected class
    ``sum_c c p_c`` (prognosis as classes, the paper's setting: higher classes, worse prognosis)."""

    required_output_keys = ("label", "layer_probs", "focus", "survival")

    def compute(self) -> float:
        labels, probs = self._collected()
        survival = self._collected_extra("survival", 3)
        known = ~np.isnan(survival[:, :2]).any(axis=1)
        if known.sum() < 2:
            return float("nan")
        predicted = survival[known, 2]
        risk = predicted if not np.isnan(predicted).any() else probs[known] @ np.arange(probs.shape[1])
        return concordance_index(survival[known, 0], survival[known, 1], risk)


class FocusRate(_SlideMetric):
    """A focus measure averaged over the annotated positive slides (``smt_monai.engines.focus_outcome``):
    ``hit`` (some layer-3 region is on tumour), ``top1`` (the layer-3 region with the highest P(positive)
    is), ``regions`` (the share of the ``K^2`` layer-3 regions that are), or with ``chance`` its expected
    value when every layer picks ``K`` tissue patches at random."""

    KINDS = ("hit", "top1", "regions")

    def __init__(self, kind: str = "hit", chance: bool = False, output_transform=lambda x: x) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        self.key = f"{kind}_chance" if chance else kind
        super().__init__(output_transform=output_transform)

    def compute(self) -> float:
        values = np.concatenate([np.zeros(0), *(np.asarray(f[self.key]) for f in self._focus)])
        values = values[~np.isnan(values)]
        return float(values.mean()) if len(values) else float("nan")


class LesionRecall(_SlideMetric):
    """Recall of the positive annotated slides by the size of their largest lesion (its greatest dimension,
    ``TumourAnnotation.largest_diameter``), as metrics ``recall_lesion_<bin>`` and ``slides_lesion_<bin>``
    (how many slides the bin holds; its recall is NaN without any).

    A slide counts as found when it is predicted positive (any class above 0, at ``threshold``). The default
    edges are the pN categories of CAMELYON17 (AJCC, for lymph-node metastases): up to 0.2 mm (isolated
    tumour cells), over 0.2 to 2 mm (micrometastases), over 2 mm (macrometastases). A method that reads
    few regions, as SMT does, finds small lesions less often than large ones; these metrics say by how much.

    Args:
        edges_mm: increasing bin edges in mm; a lesion on an edge falls in the lower bin.
        layer, threshold: as :class:`_SlideMetric`.
    """

    required_output_keys = ("label", "layer_probs", "focus", "lesion_mm")

    def __init__(
        self,
        edges_mm: Sequence[float] = (0.2, 2.0),
        layer: int = -1,
        output_transform=lambda x: x,
        threshold: float | str = 0.5,
    ) -> None:
        edges = [float(e) for e in edges_mm]
        if not edges or any(e <= 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"edges_mm must be increasing sizes in mm, got {list(edges_mm)}")
        self.edges = edges
        self.bins = lesion_bins(edges)
        super().__init__(layer=layer, output_transform=output_transform, threshold=threshold)
        self._metrics_result_mode = "flatten"  # each bin's recall and count are metrics of their own

    def compute(self) -> Mapping[str, float]:
        labels, predictions, _ = self._predicted()
        size = self._collected_extra("lesion_mm")
        known = (labels > 0) & np.isfinite(size)
        which = np.searchsorted(self.edges, size[known], side="left")
        found = predictions[known] > 0
        out: dict[str, float] = {}
        for b, name in enumerate(self.bins):
            members = which == b
            out[f"recall_lesion_{name}"] = float(found[members].mean()) if members.any() else math.nan
            out[f"slides_lesion_{name}"] = float(members.sum())
        return out


def lesion_bins(edges: Sequence[float]) -> list[str]:
    """Names of the lesion-size bins cut at ``edges`` (mm): ``up_to_0.2mm``, ``0.2_to_2mm``, ``over_2mm``."""
    names = [f"up_to_{edges[0]:g}mm"]
    names += [f"{a:g}_to_{b:g}mm" for a, b in zip(edges, edges[1:])]
    return names + [f"over_{edges[-1]:g}mm"]
