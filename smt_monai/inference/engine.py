"""Slide-list inference on MONAI's ``Evaluator``: several slides in flight, a time limit per slide.

Each iteration takes a batch of slide items (``slides_in_flight`` of them) and runs ``process`` on every one
at once, each in a thread of its own: reading (JPEG decoding, resizing) and the network release the GIL, so
the reads of one slide overlap the compute of another. A slide whose ``process`` has not returned after
``slide_timeout`` seconds (a reader hanging on a broken file) becomes an error row; its thread is left
behind as a daemon and the run goes on. The rows go to ``engine.state.output["rows"]`` for the handlers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.engines import Evaluator
from torch.utils.data import DataLoader


class SlideInference(Evaluator):
    """Runs ``process`` on every slide item of ``val_data_loader``, ``slides_in_flight`` at once.

    Args:
        device: where the network runs.
        val_data_loader: loader of slide items, batched as lists (``batch_size`` = slides in flight).
        process: item -> its row (``None`` when another run holds the slide).
        on_timeout: item, seconds -> the row of a slide that ran out of time.
        slide_timeout: seconds a slide may take (``None``: no limit).
        val_handlers: handlers to attach (progress, reporting).
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: DataLoader,
        process: Callable[[Any], dict[str, Any] | None],
        on_timeout: Callable[[Any, float], dict[str, Any]],
        slide_timeout: float | None = None,
        val_handlers: Sequence | None = None,
    ) -> None:
        super().__init__(
            device=torch.device(device),
            val_data_loader=val_data_loader,
            val_handlers=val_handlers,
            decollate=False,
        )
        self.process = process
        self.on_timeout = on_timeout
        self.slide_timeout = slide_timeout

    def _iteration(self, engine: SlideInference, batchdata: Sequence[Any]) -> dict[str, Any]:
        results: list[dict[str, Any]] = [{} for _ in batchdata]
        threads = []
        for item, result in zip(batchdata, results):
            thread = threading.Thread(target=_capture, args=(self.process, item, result), daemon=True)
            thread.start()
            threads.append(thread)
        start = time.perf_counter()
        rows = []
        for item, thread, result in zip(batchdata, threads, results):
            left = (
                None
                if self.slide_timeout is None
                else max(0.0, self.slide_timeout - (time.perf_counter() - start))
            )
            thread.join(left)
            if thread.is_alive():
                rows.append(self.on_timeout(item, float(self.slide_timeout or 0.0)))
            elif "error" in result:
                raise result["error"]
            elif result["row"] is not None:
                rows.append(result["row"])
        return {"rows": rows}


def _capture(process: Callable[[Any], dict[str, Any] | None], item: Any, result: dict[str, Any]) -> None:
    """Run ``process(item)`` into ``result``: its ``row``, or the ``error`` it raised (re-raised by the
    engine)."""
    try:
        result["row"] = process(item)
    except BaseException as exc:  # handed to the engine's thread
        result["error"] = exc
