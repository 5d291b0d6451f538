"""Inference on a list of slides: one prediction per slide, where the model looked, and how long it took.

For each slide, in input order: its layer-1 view (read in a background thread while the previous slide
computes), the cascade of :func:`~smt_monai.inference.cascade.predict_cascade` (the next chunk of regions
read while the network works on the current one), then ``OUT/<slide id>/`` with ``focus.geojson``,
``overlay.png``, ``focus_map.nii.gz`` and ``result.json``, each written atomically. ``result.json`` is
written last, so a slide whose folder holds it is done: a rerun with the same ``OUT`` skips it. Slides that
cannot be read become ``error`` rows with a one-line reason and the run goes on. ``OUT/predictions.csv``
(one row per input slide, in input order) and ``OUT/summary.json`` are rewritten at the end.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from smt_monai.data.dataset import LoadLayer1d
from smt_monai.data.regions import SlideCache
from smt_monai.data.slide import slide_id_of
from smt_monai.engines.region_io import BatchRegionReader
from smt_monai.handlers.metrics import balanced_accuracy, roc_auc
from smt_monai.inference.cascade import SlidePrediction, predict_cascade
from smt_monai.inference.writers import write_focus_map, write_geojson, write_overlay
from smt_monai.utils import atomic_path, prefetch

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"


class NoSlideSucceededError(SystemExit):
    """Every slide of the list failed; exits the process with status 1 after the reason is logged."""


def output_folders(images: Sequence[str]) -> list[str]:
    """A distinct output folder name per slide: its id, suffixed ``_2``, ``_3`` ... when ids repeat."""
    seen: dict[str, int] = {}
    names = []
    for image in images:
        base = slide_id_of(image) or "slide"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


class SlideListPredictor:
    """Run SMT inference over a slide list and write per-slide and summary outputs.

    Args:
        network: an ``SMT`` module or its TorchScript export.
        slides: entries ``{"image": path, "label": optional int}`` (``smt_monai.data.load_slide_list``).
        output_dir: where results go.
        input_side: side at which regions are read, the network's ``read_size`` (``grid * patch_size //
            stem_pool``: the stem's pooling done by the reader).
        num_focus: ``K``.
        aggregation: ``max`` or ``mean`` over the layer-3 regions.
        backend: slide backend.
        num_workers: region-reading threads.
        device: where the network runs.
        amp: bfloat16 autocast (``smt_monai.utils.fast_bf16`` says where it pays).
        class_names: names of the probability columns (default ``prob_0``, ``prob_1``, ...).
        progress: show a progress bar.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        slides: Sequence[Mapping[str, Any]],
        output_dir: str | os.PathLike,
        input_side: int,
        num_focus: int = 4,
        aggregation: str = "max",
        backend: str = "auto",
        num_workers: int = 2,
        device: torch.device | str = "cpu",
        amp: bool = False,
        class_names: Sequence[str] | None = None,
        progress: bool = True,
    ) -> None:
        self.network = network.eval()
        self.slides = list(slides)
        self.output_dir = Path(output_dir)
        self.num_focus = num_focus
        self.aggregation = aggregation
        self.device = torch.device(device)
        self.amp = amp
        self.class_names = list(class_names) if class_names else None
        self.progress = progress
        cache = SlideCache(backend, capacity=4)
        self.load_layer1 = LoadLayer1d(input_side, backend, cache=cache)
        # Chunks of K regions: layer 3 reads its K^2 regions in K chunks, one read ahead of the network.
        self.reader = BatchRegionReader(
            input_side, backend, num_workers, chunk_size=max(1, num_focus), cache=cache
        )

    def _load(self, entry: Mapping[str, Any]) -> tuple[dict, float]:
        start = time.perf_counter()
        item = self.load_layer1({"image": entry["image"]})
        return item, time.perf_counter() - start

    def run(self) -> dict[str, Any]:
        """Process every slide; returns the summary (also written to ``summary.json``).

        Raises:
            NoSlideSucceededError: no slide succeeded (exit status 1).
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        folders = output_folders([str(e["image"]) for e in self.slides])
        rows: list[dict[str, Any]] = []
        todo = [i for i, name in enumerate(folders) if not (self.output_dir / name / RESULT_FILE).exists()]
        resumed = len(self.slides) - len(todo)
        loads: dict[int, Future] = {}
        bar = tqdm(
            total=len(self.slides), desc="slides", unit="slide", disable=not self.progress, initial=resumed
        )
        seconds: list[float] = []
        with ThreadPoolExecutor(1) as loader:
            if todo:
                loads[todo[0]] = loader.submit(self._load, self.slides[todo[0]])
            for position, (entry, folder) in enumerate(zip(self.slides, folders)):
                done_file = self.output_dir / folder / RESULT_FILE
                if position not in loads:
                    rows.append(json.loads(done_file.read_text()))
                    continue
                start = time.perf_counter()
                following = [i for i in todo if i > position]
                item, load_s = loads.pop(position).result()
                if following:
                    loads[following[0]] = loader.submit(self._load, self.slides[following[0]])
                row = self._predict(entry, folder, item, load_s, start)
                rows.append(row)
                if row["status"] == "ok":
                    seconds.append(row["total_s"])
                bar.update(1)
                if seconds:
                    bar.set_postfix_str(f"{np.mean(seconds):.2f} s/slide")
        bar.close()
        self.reader.close()
        summary = self._write_tables(rows, resumed)
        if summary["ok"] == 0:
            reasons = "; ".join(sorted({r["error"] for r in rows if r["error"]}))
            logger.error("no slide succeeded (%d in the list): %s", len(rows), reasons or "empty list")
            raise NoSlideSucceededError(1)
        return summary

    def _predict(
        self, entry: Mapping[str, Any], folder: str, item: dict, load_s: float, start: float
    ) -> dict:
        row: dict[str, Any] = {
            "image": str(entry["image"]),
            "status": "error",
            "error": "",
            "label": entry.get("label", ""),
            "backend": item.get("backend", ""),
        }
        if item["error"]:
            row["error"] = item["error"]
            logger.warning("%s", item["error"])
            return row
        timings: dict[str, float] = {"read": load_s}
        try:
            prediction = predict_cascade(
                self.network,
                item["image"][None],
                item["box"][None].numpy(),
                lambda index, boxes: prefetch(self._timed_chunks(str(entry["image"]), index, boxes, timings)),
                num_focus=self.num_focus,
                aggregation=self.aggregation,
                device=self.device,
                amp=self.amp,
                timings=timings,
            )[0]
        except Exception as exc:  # a slide's failure must never stop the list; record it
            message = str(exc) if str(entry["image"]) in str(exc) else f"{entry['image']}: {exc}"
            row["error"] = " ".join(message.split())
            logger.warning("%s", row["error"])
            return row
        out = self.output_dir / folder
        out.mkdir(parents=True, exist_ok=True)
        width, height = (int(v) for v in item["dimensions"])
        mpp = None if math.isnan(float(item["mpp"])) else float(item["mpp"])
        write_geojson(prediction, width, height, out / "focus.geojson")
        write_focus_map(prediction, mpp, out / "focus_map.nii.gz")
        image = item["image"].permute(1, 2, 0).numpy()
        write_overlay(prediction, image, out / "overlay.png", title=self._title(entry, prediction))
        row.update(status="ok", prediction=prediction.prediction)
        row.update(self._prob_columns(prediction))
        row.update(
            read_s=round(timings.get("read", 0.0), 4),
            compute_s=round(timings.get("compute", 0.0), 4),
            total_s=round(load_s + time.perf_counter() - start, 4),
        )
        with atomic_path(out / RESULT_FILE) as tmp:
            tmp.write_text(json.dumps(row, indent=2))
        return row

    def _timed_chunks(
        self, path: str, slide_index: np.ndarray, boxes: np.ndarray, timings: dict[str, float]
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """The reader's chunks of one slide, adding the seconds spent reading to ``timings["read"]``."""
        chunks = self.reader.bind([path]).chunks(slide_index, boxes)
        while True:
            start = time.perf_counter()
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            timings["read"] = timings.get("read", 0.0) + time.perf_counter() - start
            yield chunk

    def _prob_columns(self, prediction: SlidePrediction) -> dict[str, float]:
        names = self.class_names or [f"prob_{c}" for c in range(len(prediction.probs))]
        return {name: round(float(p), 6) for name, p in zip(names, prediction.probs)}

    def _title(self, entry: Mapping[str, Any], prediction: SlidePrediction) -> str:
        label = f", label {entry['label']}" if entry.get("label", "") != "" else ""
        return f"{Path(str(entry['image'])).name}: P(positive) = {prediction.probs[1:].sum():.3f}{label}"

    def _write_tables(self, rows: list[dict[str, Any]], resumed: int) -> dict[str, Any]:
        prob_columns = self.class_names or sorted({k for r in rows for k in r if k.startswith("prob_")})
        columns = ["image", "status", "error", "label", "prediction", *prob_columns]
        columns += ["read_s", "compute_s", "total_s", "backend"]
        with atomic_path(self.output_dir / "predictions.csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({c: row.get(c, "") for c in columns})
        ok = [r for r in rows if r["status"] == "ok"]
        times = [float(r["total_s"]) for r in ok]
        summary: dict[str, Any] = {
            "slides": len(rows),
            "ok": len(ok),
            "error": len(rows) - len(ok),
            "resumed": resumed,
            "mean_seconds_per_slide": round(float(np.mean(times)), 4) if times else None,
            "median_seconds_per_slide": round(float(np.median(times)), 4) if times else None,
        }
        labelled = [r for r in ok if str(r.get("label", "")) != ""]
        if labelled:
            labels = np.array([int(r["label"]) for r in labelled])
            probs = np.array([[float(r[c]) for c in prob_columns] for r in labelled])
            predictions = np.array([int(r["prediction"]) for r in labelled])
            auc = roc_auc(labels, probs)
            summary.update(
                labelled=len(labelled),
                accuracy=round(float((predictions == labels).mean()), 4),
                balanced_accuracy=round(balanced_accuracy(labels, predictions), 4),
                auc=None if math.isnan(auc) else round(auc, 4),
            )
        with atomic_path(self.output_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
        return summary
