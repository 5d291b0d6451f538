"""Slide-level evaluation on MONAI's ``Evaluator``: SMT's, and the base the dense baseline's shares.

:class:`SlideEvaluator` predicts each slide of a batch (``evaluate_slide``, timed) and returns what the
metrics of :mod:`smt_monai.handlers.metrics` and ``MetricsJSONWriter`` read: every layer's own slide
prediction (layer 1 alone should stay near chance on data that needs magnification), on annotated
positive slides where the layer-3 regions landed, beside chance (``focus_measures``, not timed:
:mod:`smt_monai.engines.focus_outcome`), and the size of their largest lesion (``lesion_size``, for recall
by lesion size). :class:`SMTEvaluator` predicts with
:class:`~smt_monai.inference.api.SMTPredictor`, the code every inference runs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from ignite.metrics import Metric
from monai.engines import Evaluator
from torch.utils.data import DataLoader

from smt_monai.cascade.prediction import SlidePrediction
from smt_monai.data.annotations import TUMOUR_NAMES, AnnotationOverlap, annotation_classes
from smt_monai.data.regions import RegionReader
from smt_monai.engines.focus_outcome import (
    TUMOUR,
    FocusOutcome,
    SlidePatches,
    focus_outcome,
)
from smt_monai.inference.api import SMTPredictor

logger = logging.getLogger(__name__)


class SlideOutcome(NamedTuple):
    """One evaluated slide: ``layer_probs`` ``(layers, C)``, each layer's own slide prediction (the last is
    the method's), SMT's ``prediction`` (for :meth:`SlideEvaluator.focus_measures`) and the slide's level-0
    um/px (None when unknown)."""

    layer_probs: np.ndarray
    prediction: SlidePrediction | None = None
    mpp: float | None = None


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
        class_names: the model's class names: which annotation classes are lesions
            (:func:`~smt_monai.data.annotations.annotation_classes`; default: tumour).
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: DataLoader,
        key_val_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        class_names: Sequence[str] | None = None,
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
        self.annotations = AnnotationOverlap(annotation_classes(class_names) if class_names else TUMOUR_NAMES)

    def evaluate_slide(self, item: Mapping[str, Any]) -> SlideOutcome | None:
        """Predict one slide item; ``None`` when it cannot be (the reason is logged)."""
        raise NotImplementedError

    def focus_measures(self, item: Mapping[str, Any], outcome: SlideOutcome) -> FocusOutcome:
        """Where the slide's prediction focused (none by default: NaN)."""
        return FocusOutcome()

    def lesion_size(self, item: Mapping[str, Any], outcome: SlideOutcome) -> float:
        """The greatest dimension of the largest lesion in mm (:meth:`TumourAnnotation.largest_diameter`) on
        a positive annotated slide of known resolution; NaN otherwise."""
        mpp = outcome.mpp
        if int(item["label"]) <= 0 or not item.get("annotation") or mpp is None or not math.isfinite(mpp):
            return math.nan
        annotation = self.annotations.annotation(str(item["annotation"]))
        if annotation is None or annotation.empty:
            return math.nan
        return annotation.largest_diameter() * mpp / 1000.0

    def _iteration(self, engine: SlideEvaluator, batchdata: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        labels, outcomes, focus, lesions, seconds, survival = [], [], [], [], [], []
        for item in batchdata:
            start = time.perf_counter()
            outcome = self.evaluate_slide(item)
            if outcome is None:
                continue
            seconds.append(time.perf_counter() - start)
            labels.append(int(item["label"]))
            outcomes.append(outcome)
            focus.append(self.focus_measures(item, outcome))
            lesions.append(self.lesion_size(item, outcome))
            risk = outcome.prediction.risk if outcome.prediction is not None else None
            survival.append(
                [
                    float(item.get("time", math.nan)),
                    float(item.get("event", math.nan)),
                    math.nan if risk is None else risk,
                ]
            )
        return {
            "label": np.array(labels, dtype=int),
            "layer_probs": np.stack([o.layer_probs for o in outcomes]) if outcomes else np.zeros((0, 3, 2)),
            "focus": {name: np.array([f[i] for f in focus]) for i, name in enumerate(FocusOutcome._fields)},
            "lesion_mm": np.array(lesions, dtype=np.float64),
            "seconds": np.array(seconds),
            "survival": np.array(survival, dtype=np.float64).reshape(-1, 3),
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
        label_overlap: tumour-overlap fraction from which a layer-3 region is on tumour (one value, or
            training's pair for layers 2 and 3, of which the last counts).
        key_val_metric, additional_metrics, val_handlers, amp: as :class:`SlideEvaluator`.
        class_names: the model's class names (default: the model card's): which annotation classes are
            tumour for the focus measures (:func:`~smt_monai.data.annotations.annotation_classes`).
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
        label_overlap: float | Sequence[float] = 0.1,
        key_val_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        class_names: Sequence[str] | None = None,
    ) -> None:
        predictor = SMTPredictor(
            network, num_focus, aggregation, device=device, amp=amp, focus_source=focus_source, reader=reader
        )
        super().__init__(
            device,
            val_data_loader,
            key_val_metric,
            additional_metrics,
            val_handlers,
            amp,
            class_names or predictor.class_names,
        )
        self.network = network
        self.predictor = predictor
        self.label_overlap = float(np.ravel(label_overlap)[-1])

    def evaluate_slide(self, item: Mapping[str, Any]) -> SlideOutcome | None:
        prediction = self.predictor.predict_view(dict(item))
        if prediction.error:
            logger.warning("evaluation: skipping slide %s", prediction.error)
            return None
        return SlideOutcome(np.stack(prediction.layer_probs), prediction, prediction.mpp)

    def focus_measures(self, item: Mapping[str, Any], outcome: SlideOutcome) -> FocusOutcome:
        """The focus measures and their chance levels on a positive annotated slide."""
        prediction = outcome.prediction
        if int(item["label"]) <= 0 or not item.get("annotation") or prediction is None:
            return FocusOutcome()
        annotation = self.annotations.annotation(str(item["annotation"]))
        assert annotation is not None and prediction.fields is not None
        patches = SlidePatches.of(
            prediction.fields, prediction.boxes[0], int(self.network.grid), {TUMOUR: annotation}
        )
        return focus_outcome(prediction, patches, self.predictor.num_focus, self.label_overlap)
