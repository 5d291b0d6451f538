"""Inference on a list of slides: one prediction per slide, where the model looked, and how long it took.

:class:`SlideListPredictor` runs :class:`~smt_monai.inference.engine.SlideInference` (a MONAI ``Evaluator``)
over the slides of the list that are not done yet (``OutputFolder``), ``slides_in_flight`` at once: each
slide is claimed, its layer-1 view read, predicted by
:class:`~smt_monai.inference.api.SMTPredictor`, and its outputs written into ``OUT/<name>/``:
``focus.geojson``, ``overlay.png``, ``gallery.jpg``, ``focus_map.nii.gz`` and ``result.json`` last, each
atomically. Slides that cannot be read become ``error`` rows with a one-line reason and the run goes on.
At the end ``OUT/predictions.csv`` (one row per slide of the list, input order) and ``OUT/summary.json`` are
written; under ``torchrun`` each process takes its share and rank 0 writes them, and with ``shard`` (job
arrays) ``smt-monai merge OUT`` does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from tqdm import tqdm

from smt_monai.cascade.prediction import SlidePrediction
from smt_monai.data.errors import SlideReadError
from smt_monai.data.regions import read_boxes
from smt_monai.inference.api import SMTPredictor
from smt_monai.inference.engine import SlideInference
from smt_monai.inference.outputs import OutputFolder, network_fingerprint, parse_shard
from smt_monai.inference.writers import (
    GALLERY_TILE_PX,
    write_focus_map,
    write_gallery,
    write_geojson,
    write_overlay,
)

logger = logging.getLogger(__name__)


class NoSlideSucceededError(SystemExit):
    """Every slide of the list failed; exits the process with status 1 after the reason is logged."""


def summary_line(summary: dict[str, Any], output_dir: str | os.PathLike) -> str:
    """The line a long run ends with: how many slides went well, how many failed, where the results are."""
    errors = summary["error"]
    failed = f", {errors} error{'s' * (errors != 1)}" if errors else ""
    missing = f", {summary['missing']} not predicted yet" if summary.get("missing") else ""
    return f"{summary['ok']} slide{'s' * (summary['ok'] != 1)} ok{failed}{missing}; results in {output_dir}"


class SlideListPredictor:
    """Run SMT inference over a slide list and write per-slide and summary outputs.

    Args:
        network: an ``SMT`` module or its TorchScript export.
        slides: entries ``{"image": path, "label": optional int}`` (``smt_monai.data.load_slide_list``).
        output_dir: where results go.
        num_focus: ``K`` (default: the model card's).
        aggregation: ``max``, ``mean`` or ``learned`` over the layer-3 regions (default: the model card's).
        backend: slide backend.
        num_workers: region-reading threads.
        device: where the network runs.
        amp: bfloat16 autocast (default: where it is fast, ``smt_monai.utils.fast_bf16``).
        class_names: class names (default: the model card's); column ``prob_<name>`` holds each class's
            probability and ``class`` the predicted one's name.
        progress: show a progress bar.
        default_mpp: the scanner's level-0 um/px for slides whose file holds none.
        threshold: decision threshold on P(positive) of a binary model (default: the model card's).
        gallery_top: the last layer's regions of highest P(positive) shown in ``gallery.jpg`` (0: none).
        slides_in_flight: slides predicted at once, each in a thread (reads of one overlap another's
            compute).
        slide_timeout: seconds a slide may take before it becomes an error row (``None``: no limit).
        shard: ``"I/N"``: predict every N-th slide from the I-th (job arrays; ``smt-monai merge OUT`` writes
            the tables); under ``torchrun`` the processes share the list by rank.
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
        slides_in_flight: int = 1,
        slide_timeout: float | None = None,
        shard: str | Sequence[int] | None = None,
    ) -> None:
        self.slides = list(slides)
        self.gallery_top = gallery_top
        self.default_mpp = default_mpp
        self.slides_in_flight = max(1, int(slides_in_flight))
        self.slide_timeout = slide_timeout
        self.shard = parse_shard(shard)
        self.timed_out: set[int] = set()
        self.output_dir = Path(output_dir)
        self.progress = progress
        self.predictor = SMTPredictor(
            network, num_focus, aggregation, backend, num_workers, device, amp,
            default_mpp=default_mpp, threshold=threshold, open_slides=max(4, self.slides_in_flight + 1),
        )  # fmt: skip
        if class_names:
            self.predictor.class_names = list(class_names)
        self.prob_columns = [f"prob_{name}" for name in self.predictor.class_names]

    def run(self) -> dict[str, Any]:
        """Predict every pending slide; returns the summary (also written to ``summary.json``).

        Raises:
            NoSlideSucceededError: no slide succeeded, or the list is empty (exit status 1).
            OutputError: ``output_dir`` cannot be written.
        """
        if not self.slides:
            logger.error("the slide list is empty: give slides (--datalist LIST, or files, folders, lists)")
            raise NoSlideSucceededError(1)
        distributed = dist.is_available() and dist.is_initialized()
        shard = (dist.get_rank(), dist.get_world_size()) if distributed else self.shard
        options = {
            "num_focus": self.predictor.num_focus,
            "aggregation": self.predictor.aggregation,
            "threshold": self.predictor.threshold,
            "default_mpp": self.default_mpp,
            "class_names": self.predictor.class_names,
        }
        self.outputs = OutputFolder(
            self.output_dir, self.slides, network_fingerprint(self.predictor.network), options, shard
        )
        pending = self.outputs.pending()
        mine = len(self.outputs.mine())
        loader = DataLoader(Dataset(pending), batch_size=self.slides_in_flight, collate_fn=list)
        bar = tqdm(
            total=mine, initial=mine - len(pending), desc="slides", unit="slide", disable=not self.progress
        )
        engine = SlideInference(
            self.predictor.device, loader, self._process, self._timed_out, self.slide_timeout
        )
        engine.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e: bar.update(len(e.state.output["rows"]))
        )
        try:
            if pending:
                engine.run()
        finally:
            bar.close()
            self.predictor.close()
        if distributed:
            dist.barrier()
        if shard is not None and (not distributed or dist.get_rank() != 0):
            logger.info("shard %d/%d done; merge with: smt-monai merge %s", *shard, self.output_dir)
            return {"slides": mine, "ok": 0, "error": 0, "pending": len(pending)}
        run = {"resumed": mine - len(pending)}
        summary = self.outputs.write_tables(self.predictor.class_names, skip=self.timed_out, run=run)
        logger.info("%s", summary_line(summary, self.output_dir))
        if summary["ok"] == 0:
            reasons = "; ".join(sorted({r["error"] for r in self.outputs.rows(False) if r.get("error")}))
            logger.error("no slide succeeded (%d in the list): %s", len(self.slides), reasons or "empty list")
            raise NoSlideSucceededError(1)
        return summary

    def _process(self, index: int) -> dict[str, Any] | None:
        """Claim, read, predict and write one slide (all within its time limit); ``None`` when another run
        holds it."""
        with self.outputs.claim(index) as mine:
            if not mine:
                return None
            view = self.predictor.view(str(self.slides[index]["image"]))
            row = self._write(index, self.predictor.predict_view(view))
            self.outputs.record(index, row)
            return row

    def _timed_out(self, index: int, seconds: float) -> dict[str, Any]:
        self.timed_out.add(index)
        row = self._row(index, "")
        row["error"] = (
            f"{self.slides[index]['image']}: took longer than {seconds:g} s (slide_timeout); skipped"
        )
        logger.warning("%s", row["error"])
        self.outputs.record(index, row)
        return row

    def _row(self, index: int, backend: str) -> dict[str, Any]:
        entry = self.slides[index]
        return {"image": str(entry["image"]), "status": "error", "error": "", "label": entry.get("label", ""),
                "backend": backend}  # fmt: skip

    def _write(self, index: int, prediction: SlidePrediction) -> dict[str, Any]:
        """Write one slide's outputs and return its row of ``predictions.csv``."""
        entry = self.slides[index]
        row = self._row(index, prediction.backend)
        if prediction.error:
            row["error"] = prediction.error
            logger.warning("%s", prediction.error)
            return row
        try:
            self._write_outputs(entry, prediction, self.outputs.folder(index))
        except (OSError, SlideReadError) as exc:  # a slide's outputs failing never stops the list
            row["error"] = f"{entry['image']}: cannot write its outputs ({' '.join(str(exc).split())})"
            logger.warning("%s", row["error"])
            return row
        row.update(status="ok", prediction=prediction.prediction, **{"class": prediction.label})
        row.update(self._prob_columns(prediction))
        if prediction.risk is not None:
            row["risk"] = round(prediction.risk, 6)
        row.update(
            scan_mpp="" if prediction.mpp is None else round(prediction.mpp, 4),
            read_mpp="" if prediction.read_mpp is None else round(prediction.read_mpp, 4),
            tissue_mm2="" if prediction.tissue_mm2 is None else round(prediction.tissue_mm2, 3),
            read_s=round(prediction.read_s, 4),
            compute_s=round(prediction.compute_s, 4),
            total_s=round(prediction.seconds, 4),
        )
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
            write_gallery(prediction, read, out / "gallery.jpg", self.gallery_top, prediction.mpp, title)

    def _prob_columns(self, prediction: SlidePrediction) -> dict[str, float]:
        return {name: round(float(p), 6) for name, p in zip(self.prob_columns, prediction.probs)}

    def _title(self, entry: Mapping[str, Any], prediction: SlidePrediction) -> str:
        label = f", label {entry['label']}" if entry.get("label", "") != "" else ""
        verdict = f"{prediction.label}, P(positive) = {prediction.positive:.3f}"
        return f"{Path(str(entry['image'])).name}: {verdict}{label}"
