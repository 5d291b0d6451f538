"""The SMT evaluator: MONAI's ``Evaluator`` whose iteration runs the inference cascade on a batch of slides.

The per-batch output feeds the metrics of :mod:`smt_monai.handlers.metrics`: every layer's own slide
prediction (layer 1 alone should stay near chance on data that needs magnification), and on annotated
positive slides whether the layer-3 regions found the tumour.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric
from monai.engines import Evaluator
from torch.utils.data import DataLoader

from smt_monai.data.errors import SlideReadError
from smt_monai.engines.region_io import AnnotationOverlap, BatchRegionReader
from smt_monai.focus.score import check_focus_source
from smt_monai.inference.cascade import SlidePrediction, predict_cascade

logger = logging.getLogger(__name__)


def focus_outcome(prediction: SlidePrediction, label: int, overlap: np.ndarray | None) -> tuple[float, float]:
    """``(hit, precise)`` for one slide: NaN unless it is positive and annotated.

    ``hit``: the tumour overlaps at least one last-layer region; ``precise``: the last-layer region with the
    highest positive mass overlaps the tumour.
    """
    if label <= 0 or overlap is None or np.isnan(overlap).all():
        return float("nan"), float("nan")
    positive = prediction.region_probs[-1][:, 1:].sum(axis=1)
    return float((overlap > 0).any()), float(overlap[int(np.argmax(positive))] > 0)


class SMTEvaluator(Evaluator):
    """Evaluates SMT slide by slide with the inference cascade.

    Args:
        device: where the network runs.
        val_data_loader: loader of layer-1 items.
        network: an ``SMT`` module.
        reader: reader of the focused regions.
        num_focus: ``K``.
        aggregation: ``max`` or ``mean`` over the layer-3 regions.
        focus_source: what each top-K is taken by: ``"q"`` (SMT), ``"score"`` or ``"attention"``
            (``predict_cascade``; the ablations).
        key_val_metric: ``{name: metric}`` that decides the best checkpoint.
        additional_metrics: more metrics.
        val_handlers: handlers to attach.
        amp: bfloat16 autocast (``smt_monai.utils.fast_bf16`` says where it pays).
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: DataLoader,
        network: torch.nn.Module,
        reader: BatchRegionReader,
        num_focus: int = 4,
        aggregation: str = "max",
        focus_source: str = "q",
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
            # ties go to the later epoch: the best model is the most trained of the equally accurate ones
            metric_cmp_fn=lambda current, best: current >= best,
            val_handlers=val_handlers,
            amp=amp,
            decollate=False,
        )
        self.network = network
        self.reader = reader
        self.overlap = AnnotationOverlap()
        self.num_focus = num_focus
        self.aggregation = aggregation
        self.focus_source = check_focus_source(focus_source)

    def _iteration(self, engine: SMTEvaluator, batchdata: dict[str, Any]) -> dict[str, Any]:
        self.network.eval()
        results = []
        for i, path in enumerate(batchdata["path"]):
            label = int(torch.as_tensor(batchdata["label"])[i])
            if batchdata["error"][i]:
                logger.warning("evaluation: skipping slide %s: %s", path, batchdata["error"][i])
                continue
            start = time.perf_counter()
            try:
                prediction = predict_cascade(
                    self.network,
                    batchdata["image"][i : i + 1],
                    batchdata["box"][i : i + 1].numpy(),
                    self.reader.bind([path]).chunks,
                    num_focus=self.num_focus,
                    aggregation=self.aggregation,
                    device=self.state.device,
                    amp=self.amp,
                    focus_source=self.focus_source,
                )[0]
            except SlideReadError as exc:
                logger.warning("evaluation: skipping slide %s: %s", path, exc)
                continue
            seconds = time.perf_counter() - start
            overlap = None
            if batchdata["annotation"][i]:
                overlap = self.overlap.bind([batchdata["annotation"][i]])(
                    np.zeros(len(prediction.boxes[-1]), dtype=np.int64), prediction.boxes[-1]
                ).numpy()
            hit, precise = focus_outcome(prediction, label, overlap)
            results.append((label, np.stack(prediction.layer_probs), hit, precise, seconds, path, prediction))
        if not results:
            return {"label": np.zeros(0, int), "layer_probs": np.zeros((0, 3, 2)), "hit": [], "precise": []}
        return {
            "label": np.array([r[0] for r in results]),
            "layer_probs": np.stack([r[1] for r in results]),
            "hit": np.array([r[2] for r in results]),
            "precise": np.array([r[3] for r in results]),
            "seconds": np.array([r[4] for r in results]),
            "path": [r[5] for r in results],
            "predictions": [r[6] for r in results],
        }
