"""Reporting handlers: a tqdm progress bar with running values, and the evaluation's ``metrics.json``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

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
        def clean(value: float) -> float | None:
            value = float(value)
            return None if math.isnan(value) else round(value, 6)

        metrics = {name: clean(value) for name, value in engine.state.metrics.items()}
        metrics["num_slides"] = len(self.seconds)
        metrics["seconds_per_slide"] = clean(np.mean(self.seconds)) if self.seconds else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
