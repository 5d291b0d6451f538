"""Slide-level evaluation on MONAI's ``Evaluator``: SMT's, and the base the dense baseline's shares.

:class:`SlideEvaluator` predicts each slide of a batch (``evaluate_slide``) and returns what the metrics of
:mod:`smt_monai.handlers.metrics` and ``MetricsJSONWriter`` read: every layer's own slide prediction (layer 1
alone should stay near chance on data that needs magnification), and on annotated positive slides whether
the layer-3 regions found the tumour. :class:`SMTEvaluator` predicts with
:class:`~smt_monai.inference.api.SMTPredictor`, the code every inference runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from ignite.metrics import Metric
from monai.engines import Evaluator
from torch.utils.data import DataLoader

from smt_monai.cascade.prediction import SlidePrediction
from smt_monai.data.annotations import AnnotationOverlap
from smt_monai.data.regions import RegionReader
from smt_monai.inference.api import SMTPredictor

logger = logging.getLogger(__name__)


class SlideOutcome(NamedTuple):
    """One evaluated slide: ``layer_probs`` ``(layers, C)``, each layer's own slide prediction (the last is
    the method's); ``hit`` and ``precise``, the focus outcomes (NaN where they do not apply)."""

    layer_probs: np.ndarray
    hit: float = float("nan")
    precise: float = float("nan")


def focus_outcome(prediction: SlidePrediction, label: int, overlap: np.ndarray | None) -> tuple[float, float]:
    """``(hit, precise)`` for one slide: NaN unless it is positive and annotated.

    ``hit``: the tumour overlaps at least one last-layer region; ``precise``: the last-layer region with the
    highest positive mass overlaps the tumour.
    """
    if label <= 0 or overlap is None or np.isnan(overlap).all():
        return float("nan"), float("nan")
    positive = prediction.region_probs[-1][:, 1:].sum(axis=1)
    return float((overlap > 0).any()), float(overlap[int(np.argmax(positive))] > 0)


class SlideEvaluator(Evaluator):
    """MONAI ``Evaluator`` whose iteration evaluates the slides of a batch one by one.

    Subclasses implement :meth:`evaluate_slide`. A slide that cannot be evaluated is logged by name and
    left out. Ties of the key metric go to the later epoch: the best model is the most trained of the equally
    good ones.

    Args:
        device: where the network runs.
        val_data_loader: loader of slide items (at least ``path`` or ``image``, and ``label``), batched as
            lists (``collate_fn=smt_monai.data.view_list``).
        key_val_metric: ``{name: metric}`` that decides the best checkpoint.
        additional_metrics: more metrics.
        val_handlers: handlers to attach.
        amp: bfloat16 autocast (``smt_monai.utils.fast_bf16`` says where it pays).
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: DataLoader,
        key_val_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
    ) -> None:
        super().__init__(
            device=torch.device(device),
            val_data_loader=val_data_loader,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=lambda current, best: current >= best,
            val_handlers=val_handlers,
            amp=amp,
            decollate=False,
        )

    def evaluate_slide(self, item: Mapping[str, Any]) -> SlideOutcome | None:
        """Predict one slide item; ``None`` when it cannot be (the reason is logged)."""
        raise NotImplementedError

    def _iteration(self, engine: SlideEvaluator, batchdata: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        labels, outcomes, seconds = [], [], []
        for item in batchdata:
            start = time.perf_counter()
            outcome = self.evaluate_slide(item)
            if outcome is None:
                continue
            seconds.append(time.perf_counter() - start)
            labels.append(int(item["label"]))
            outcomes.append(outcome)
        if not outcomes:
            return {"label": np.zeros(0, int), "layer_probs": np.zeros((0, 3, 2)), "hit": [], "precise": []}
        return {
            "label": np.array(labels),
            "layer_probs": np.stack([o.layer_probs for o in outcomes]),
            "hit": np.array([o.hit for o in outcomes]),
            "precise": np.array([o.precise for o in outcomes]),
            "seconds": np.array(seconds),
        }


class SMTEvaluator(SlideEvaluator):
    """Evaluates SMT slide by slide from the slides' (cached) layer-1 views.

    Args:
        device: where the network runs.
        val_data_loader: loader of layer-1 items (``smt_monai.data.dataset.layer1_dataset``).
        network: an ``SMT`` module.
        reader: reader of the focused regions.
        num_focus: ``K``.
        aggregation: ``max`` or ``mean`` over the layer-3 regions.
        focus_source: what each top-K is taken by: ``"q"`` (SMT), ``"score"`` or ``"attention"`` (the
            ablations).
        key_val_metric, additional_metrics, val_handlers, amp: as :class:`SlideEvaluator`.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: DataLoader,
        network: torch.nn.Module,
        reader: RegionReader,
        num_focus: int = 4,
        aggregation: str = "max",
        focus_source: str = "q",
        key_val_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
    ) -> None:
        super().__init__(device, val_data_loader, key_val_metric, additional_metrics, val_handlers, amp)
        self.network = network
        self.predictor = SMTPredictor(
            network, num_focus, aggregation, device=device, amp=amp, focus_source=focus_source, reader=reader
        )
        self.overlap = AnnotationOverlap()

    def evaluate_slide(self, item: Mapping[str, Any]) -> SlideOutcome | None:
        prediction = self.predictor.predict_view(dict(item))
        if prediction.error:
            logger.warning("evaluation: skipping slide %s", prediction.error)
            return None
        overlap = None
        if item["annotation"]:
            last = prediction.boxes[-1]
            overlap = self.overlap([item["annotation"]], np.zeros(len(last), dtype=np.int64), last)
        hit, precise = focus_outcome(prediction, int(item["label"]), overlap)
        return SlideOutcome(np.stack(prediction.layer_probs), hit, precise)
