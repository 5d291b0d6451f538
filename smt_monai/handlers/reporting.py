"""Reporting handlers: a tqdm progress bar with running values, the evaluation's ``metrics.json``, and its
confusion matrix as a picture (PNG and TensorBoard)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

from smt_monai.utils import atomic_path


class ProgressBarHandler:
    """Ignite's tqdm progress bar over iterations, showing the named values of the engine's output.

    Args:
        output_keys: keys of ``engine.state.output`` to show (e.g. ``["loss"]``).
        persist: keep the bar of every epoch on screen.
    """

    def __init__(self, output_keys: Sequence[str] = ("loss",), persist: bool = False) -> None:
        self.output_keys = list(output_keys)
        self.bar = ProgressBar(persist=persist)

    def attach(self, engine: Engine) -> None:
        self.bar.attach(engine, output_transform=self._values)

    def _values(self, output: dict) -> dict[str, float]:
        return {k: output[k] for k in self.output_keys if isinstance(output, dict) and k in output}


class MetricsJSONWriter:
    """Write ``engine.state.metrics`` plus slide count and seconds per slide to a JSON file when a run ends.

    Reads ``seconds`` (per slide) from each iteration's output, as :class:`SMTEvaluator` returns it. NaN
    metrics (e.g. AUC on one class) are written as ``null``.

    Args:
        path: output file (written atomically; its folder is created).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.seconds: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.seconds.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self)

    def _collect(self, engine: Engine) -> None:
        self.seconds.extend(float(s) for s in np.asarray(engine.state.output.get("seconds", [])).ravel())

    def __call__(self, engine: Engine) -> None:
        def clean(value: Any) -> Any:
            if isinstance(value, list):  # e.g. the confusion matrix
                return value
            value = float(value)
            return None if math.isnan(value) else round(value, 6)

        metrics = {name: clean(value) for name, value in engine.state.metrics.items()}
        metrics["num_slides"] = len(self.seconds)
        metrics["seconds_per_slide"] = clean(np.mean(self.seconds)) if self.seconds else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")


class ConfusionMatrixWriter:
    """Draw the evaluation's confusion matrix (the ``metric`` holding :class:`~smt_monai.handlers.metrics.
    ConfusionMatrix`) when a run ends: a PNG with counts and row-normalised shading, and, with ``log_dir``,
    the same figure in TensorBoard (tag ``<tag>/confusion_matrix``, one per epoch), beside the scalars.

    Args:
        path: the PNG (written atomically; its folder is created).
        class_names: one name per class, for the axes.
        metric: the name the confusion matrix is attached under.
        log_dir: TensorBoard folder (None: no TensorBoard figure).
        tag: TensorBoard tag prefix.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        class_names: Sequence[str],
        metric: str = "confusion_matrix",
        log_dir: str | os.PathLike | None = None,
        tag: str = "val",
    ) -> None:
        self.path = Path(path)
        self.class_names = [str(n) for n in class_names]
        self.metric = metric
        self.log_dir = log_dir
        self.tag = tag
        self._writer: Any = None  # one TensorBoard event file for all the evaluations of a run

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def figure(self, counts: np.ndarray) -> Any:
        """The confusion matrix as a matplotlib figure."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        count = len(counts)
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(1.2 * count + 2.2, 1.1 * count + 1.6))
        ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        for row in range(count):
            for col in range(count):
                colour = "white" if share[row, col] > 0.6 else "black"
                ax.text(col, row, str(int(counts[row, col])), ha="center", va="center", color=colour)
        ax.set_xticks(range(count), self.class_names, rotation=30, ha="right")
        ax.set_yticks(range(count), self.class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{int(counts.sum())} slides, shading: share of the true class")
        fig.tight_layout()
        return fig

    def __call__(self, engine: Engine) -> None:
        import matplotlib.pyplot as plt

        counts = np.asarray(engine.state.metrics.get(self.metric, []), dtype=np.int64)
        if counts.ndim != 2 or not counts.size:
            return
        fig = self.figure(counts)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        if self.log_dir is not None:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.log_dir))
            self._writer.add_figure(f"{self.tag}/confusion_matrix", fig, global_step=engine.state.epoch)
            self._writer.flush()
        plt.close(fig)
