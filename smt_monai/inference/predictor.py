"""Inference on a list of slides: one prediction per slide, where the model looked, and how long it took.

For each slide, in input order: its prediction by :class:`~smt_monai.inference.api.SMTPredictor` (the next
slide's layer-1 view read in a background thread while the current one computes), then ``OUT/<slide id>/``
with ``focus.geojson``, ``overlay.png``, ``gallery.png``, ``focus_map.nii.gz`` and ``result.json``, each
written atomically.
``result.json`` is written last, so a slide whose folder holds it is done: a rerun with the same ``OUT`` skips
it. Slides that cannot be read become ``error`` rows with a one-line reason and the run goes on.
``OUT/predictions.csv`` (one row per input slide, in input order) and ``OUT/summary.json`` are rewritten at
the end.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from smt_monai.cascade.prediction import SlidePrediction
from smt_monai.data.errors import SlideReadError
from smt_monai.data.regions import read_boxes
from smt_monai.data.slide import slide_id_of
from smt_monai.handlers.metrics import balanced_accuracy, roc_auc
from smt_monai.inference.api import SMTPredictor
from smt_monai.inference.writers import (
    GALLERY_TILE_PX,
    write_focus_map,
    write_gallery,
    write_geojson,
    write_overlay,
)
from smt_monai.utils import atomic_path, remove_stale_temporaries

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


def summary_line(summary: dict[str, Any], output_dir: str | os.PathLike) -> str:
    """The line a long run ends with: how many slides went well, how many failed, where the results are."""
    errors = summary["error"]
    failed = f", {errors} error{'s' * (errors != 1)}" if errors else ""
    return f"{summary['ok']} slide{'s' * (summary['ok'] != 1)} ok{failed}; results in {output_dir}"


class SlideListPredictor:
    """Run SMT inference over a slide list and write per-slide and summary outputs.

    Args:
        network: an ``SMT`` module or its TorchScript export.
        slides: entries ``{"image": path, "label": optional int}`` (``smt_monai.data.load_slide_list``).
        output_dir: where results go.
        num_focus: ``K`` (default: the model card's).
        aggregation: ``max`` or ``mean`` over the layer-3 regions (default: the model card's).
        backend: slide backend.
        num_workers: region-reading threads.
        device: where the network runs.
        amp: bfloat16 autocast (default: where it is fast, ``smt_monai.utils.fast_bf16``).
        class_names: class names (default: the model card's); column ``prob_<name>`` holds each class's
            probability and ``class`` the predicted one's name.
        progress: show a progress bar.
        default_mpp: the scanner's level-0 um/px for slides whose file holds none.
        threshold: decision threshold on P(positive) of a binary model (default: the model card's).
        gallery_top: the last layer's regions of highest P(positive) shown in ``gallery.png`` (0: none).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        slides: Sequence[Mapping[str, Any]],
        output_dir: str | os.PathLike,
        num_focus: int | None = None,
        aggregation: str | None = None,
        backend: str = "auto",
        num_workers: int = 2,
        device: torch.device | str = "cpu",
        amp: bool | None = None,
        class_names: Sequence[str] | None = None,
        progress: bool = True,
        default_mpp: float | None = None,
        threshold: float | None = None,
        gallery_top: int = 8,
    ) -> None:
        self.slides = list(slides)
        self.gallery_top = gallery_top
        self.output_dir = Path(output_dir)
        self.progress = progress
        self.predictor = SMTPredictor(
            network, num_focus, aggregation, backend, num_workers, device, amp,
            default_mpp=default_mpp, threshold=threshold,
        )  # fmt: skip
        if class_names:
            self.predictor.class_names = list(class_names)
        self.prob_columns = [f"prob_{name}" for name in self.predictor.class_names]

    def run(self) -> dict[str, Any]:
        """Process every slide; returns the summary (also written to ``summary.json``).

        Raises:
            NoSlideSucceededError: no slide succeeded (exit status 1).
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.output_dir, *self.output_dir.iterdir()):
            if folder.is_dir():
                remove_stale_temporaries(folder)
        folders = output_folders([str(e["image"]) for e in self.slides])
        todo = {i for i, name in enumerate(folders) if not (self.output_dir / name / RESULT_FILE).exists()}
        resumed = len(self.slides) - len(todo)
        bar = tqdm(
            total=len(self.slides), desc="slides", unit="slide", disable=not self.progress, initial=resumed
        )
        results = self.predictor.predict_many([str(self.slides[i]["image"]) for i in sorted(todo)])
        rows: list[dict[str, Any]] = []
        seconds: list[float] = []
        for position, (entry, folder) in enumerate(zip(self.slides, folders)):
            if position not in todo:
                rows.append(json.loads((self.output_dir / folder / RESULT_FILE).read_text()))
                continue
            row = self._write(entry, folder, next(results))
            rows.append(row)
            if row["status"] == "ok":
                seconds.append(row["total_s"])
            bar.update(1)
            if seconds:
                bar.set_postfix_str(f"{np.mean(seconds):.2f} s/slide")
        bar.close()
        self.predictor.close()
        summary = self._write_tables(rows, resumed)
        logger.info("%s", summary_line(summary, self.output_dir))
        if summary["ok"] == 0:
            reasons = "; ".join(sorted({r["error"] for r in rows if r["error"]}))
            logger.error("no slide succeeded (%d in the list): %s", len(rows), reasons or "empty list")
            raise NoSlideSucceededError(1)
        return summary

    def _write(self, entry: Mapping[str, Any], folder: str, prediction: SlidePrediction) -> dict[str, Any]:
        """Write one slide's outputs (``result.json`` last) and return its row of ``predictions.csv``."""
        row: dict[str, Any] = {
            "image": str(entry["image"]),
            "status": "error",
            "error": "",
            "label": entry.get("label", ""),
            "backend": prediction.backend,
        }
        if prediction.error:
            row["error"] = prediction.error
            logger.warning("%s", prediction.error)
            return row
        out = self.output_dir / folder
        try:
            self._write_outputs(entry, prediction, out)
        except (OSError, SlideReadError) as exc:  # a slide's outputs failing never stops the list
            row["error"] = f"{entry['image']}: cannot write its outputs ({' '.join(str(exc).split())})"
            logger.warning("%s", row["error"])
            return row
        row.update(status="ok", prediction=prediction.prediction, **{"class": prediction.label})
        row.update(self._prob_columns(prediction))
        row.update(
            scan_mpp="" if prediction.mpp is None else round(prediction.mpp, 4),
            read_mpp="" if prediction.read_mpp is None else round(prediction.read_mpp, 4),
            read_s=round(prediction.read_s, 4),
            compute_s=round(prediction.compute_s, 4),
            total_s=round(prediction.seconds, 4),
        )
        with atomic_path(out / RESULT_FILE) as tmp:
            tmp.write_text(json.dumps(row, indent=2))
        return row

    def _write_outputs(self, entry: Mapping[str, Any], prediction: SlidePrediction, out: Path) -> None:
        """The slide's GeoJSON, focus map, overlay and gallery (``result.json`` is written after them)."""
        out.mkdir(parents=True, exist_ok=True)
        width, height = prediction.dimensions
        title = self._title(entry, prediction)
        write_geojson(prediction, width, height, out / "focus.geojson")
        write_focus_map(prediction, prediction.mpp, out / "focus_map.nii.gz")
        write_overlay(prediction, out / "overlay.png", title=title)
        if self.gallery_top:
            slide = self.predictor.reader.cache.get(prediction.path)
            read = lambda box: read_boxes(slide, np.asarray([box]), GALLERY_TILE_PX)[0]  # noqa: E731
            write_gallery(prediction, read, out / "gallery.png", self.gallery_top, prediction.mpp, title)

    def _prob_columns(self, prediction: SlidePrediction) -> dict[str, float]:
        return {name: round(float(p), 6) for name, p in zip(self.prob_columns, prediction.probs)}

    def _title(self, entry: Mapping[str, Any], prediction: SlidePrediction) -> str:
        label = f", label {entry['label']}" if entry.get("label", "") != "" else ""
        verdict = f"{prediction.label}, P(positive) = {prediction.positive:.3f}"
        return f"{Path(str(entry['image'])).name}: {verdict}{label}"

    def _write_tables(self, rows: list[dict[str, Any]], resumed: int) -> dict[str, Any]:
        prob_columns = self.prob_columns
        columns = ["image", "status", "error", "label", "prediction", "class", *prob_columns]
        columns += ["scan_mpp", "read_mpp", "read_s", "compute_s", "total_s", "backend"]
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
