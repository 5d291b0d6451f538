"""The output folder of a slide list: a folder per slide, what may be reused, who works on what, the tables.

Archives of tens of thousands of slides are predicted in several processes (``torchrun``), job arrays
(``shard``) and reruns after a crash, often on one shared ``OUT``. What keeps that safe:

- Each slide's outputs go to ``OUT/<name>/``, ``name`` made from its file name with nothing that could
  leave ``OUT`` (no ``.``/``..``, separators or control characters) and a suffix where names collide.
- A slide is done when its ``result.json`` exists; it records the slide file (path, size, modification
  time), the model (a hash of its weights and card) and the options. A rerun reuses it only when all three
  are the same; otherwise the slide is predicted again. A result that cannot be read (a run killed while
  writing it) is redone, with a line naming the file; temporary files of killed writers are removed.
- A slide is claimed while it is predicted (an exclusive ``flock`` on ``OUT/.locks/<name>``, released by the
  kernel when a process dies), so two runs on one ``OUT`` never predict the same slide; each waits for the
  other's slides at the end, and both leave a ``predictions.csv`` holding every slide of the list.
- ``shard=(i, n)`` takes every n-th slide from the i-th; ``OUT/slides.json`` keeps the whole list, so
  ``smt-monai merge OUT`` (or the end of a ``torchrun`` run) writes one ``predictions.csv`` in input order.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import socket
import unicodedata
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smt_monai.data.errors import UserError
from smt_monai.data.slide import slide_id_of
from smt_monai.handlers.metrics import balanced_accuracy, roc_auc
from smt_monai.utils import atomic_path, remove_stale_temporaries

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
SLIDES_FILE = "slides.json"
LOCKS = ".locks"
FIXED_COLUMNS = ("image", "status", "error", "label", "prediction", "class")
MAX_NAME = 120
"""The longest per-slide folder name (file systems allow 255 bytes; the names are ASCII)."""
TIMING_COLUMNS = ("scan_mpp", "read_mpp", "tissue_mm2", "read_s", "compute_s", "total_s", "backend")


class OutputError(UserError, ValueError):
    """The output folder cannot be used; the message names it and the problem."""


def safe_names(images: Sequence[str]) -> list[str]:
    """A folder name per slide that stays inside ``OUT``: its file name without the extension, accents
    dropped (``Müller_Ø1`` becomes ``Muller__1``; NFKD, then the combining marks removed), characters other
    than ASCII letters, digits, ``-``, ``_`` and inner dots replaced by ``_``, leading dots dropped (``...``
    and ``..tiff`` become ``slide``), cut to ``MAX_NAME`` characters (a list entry can be longer than a file
    system allows a name), suffixed ``_2``, ``_3`` ... where names repeat (case-insensitively)."""
    used: set[str] = set()
    names = []
    for image in images:
        plain = "".join(
            c for c in unicodedata.normalize("NFKD", slide_id_of(image)) if not unicodedata.combining(c)
        )
        base = re.sub(r"[^A-Za-z0-9._-]", "_", plain).lstrip(".")[:MAX_NAME] or "slide"
        name, count = base, 1
        while name.lower() in used:
            count += 1
            name = f"{base}_{count}"
        used.add(name.lower())
        names.append(name)
    return names


def slide_identity(path: str) -> dict[str, Any]:
    """What identifies a slide file for reuse: its absolute path, size and modification time."""
    absolute = os.path.abspath(path)
    try:
        stat = os.stat(absolute)
    except OSError:
        return {"path": absolute, "missing": True}
    return {"path": absolute, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def network_fingerprint(network: torch.nn.Module) -> str:
    """A hash of a network's weights and model card: equal for the same model, eager or TorchScript."""
    digest = hashlib.sha256(str(getattr(network, "card", "")).encode())
    for name, tensor in sorted(network.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def parse_shard(shard: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"I/N"`` (or ``(I, N)``) as ``(I, N)``; ``None`` stays ``None``.

    Raises:
        OutputError: not ``I/N`` with ``0 <= I < N``.
    """
    if shard is None or shard == "":
        return None
    parts = shard.split("/") if isinstance(shard, str) else list(shard)
    try:
        index, count = (int(p) for p in parts)
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise OutputError(f"shard {shard!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return index, count


class OutputFolder:
    """The output folder ``path`` of the slide list ``slides`` predicted by one model with one set of options.

    Args:
        path: ``OUT``.
        slides: ``{"image": path, "label": optional}`` entries, in input order.
        fingerprint: the model's ``network_fingerprint``.
        options: the inference options that change results (K, aggregation, threshold, default mpp).
        shard: ``(i, n)``: this process predicts the slides whose index ``% n == i``.

    Raises:
        OutputError: ``path`` cannot be created or written.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        slides: Sequence[Mapping[str, Any]],
        fingerprint: str,
        options: Mapping[str, Any],
        shard: tuple[int, int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.slides = [dict(entry) for entry in slides]
        self.names = safe_names([str(entry["image"]) for entry in self.slides])
        self.fingerprint = fingerprint
        self.options = json.loads(json.dumps(dict(options), default=str))
        self.shard = shard
        try:
            (self.path / LOCKS).mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path / SLIDES_FILE) as tmp:
                tmp.write_text(json.dumps([str(entry["image"]) for entry in self.slides], indent=1) + "\n")
        except OSError as exc:
            raise OutputError(
                f"{self.path}: cannot write the output folder ({exc.strerror or exc})"
            ) from None
        remove_stale_temporaries(self.path)

    def mine(self) -> list[int]:
        """Indices of the slides this process predicts (all of them, or its shard's)."""
        indices = range(len(self.slides))
        return (
            list(indices)
            if self.shard is None
            else [i for i in indices if i % self.shard[1] == self.shard[0]]
        )

    def folder(self, index: int) -> Path:
        return self.path / self.names[index]

    def done_row(self, index: int, reuse: bool = True) -> dict[str, Any] | None:
        """The recorded row of slide ``index`` if it stands: same file, same model, same options. A failed
        slide's row is recorded for the tables but not reused (``reuse``): a rerun tries it again."""
        result = self.folder(index) / RESULT_FILE
        if not result.exists():
            return None
        try:
            record = json.loads(result.read_text())
            row, slide, model, options = record["row"], record["slide"], record["model"], record["options"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("%s: unreadable (%s); the slide is predicted again", result, type(exc).__name__)
            return None
        image = str(self.slides[index]["image"])
        if slide != slide_identity(image) or model != self.fingerprint or options != self.options:
            return None
        if reuse and row.get("status") != "ok":
            return None
        return {**row, "image": image, "label": self.slides[index].get("label", "")}

    def pending(self) -> list[int]:
        """This process's slides that are not done (temporary files that killed writers left in their folders
        are removed on the way)."""
        todo = []
        for index in self.mine():
            remove_stale_temporaries(self.folder(index))
            if self.done_row(index) is None:
                todo.append(index)
        return todo

    @contextlib.contextmanager
    def claim(self, index: int, wait: bool = False) -> Iterator[bool]:
        """Hold slide ``index`` while it is predicted; yields whether this process holds it (``False``:
        another run does). With ``wait``, block until the other run lets go."""
        with open(self.path / LOCKS / f"{self.names[index]}.lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def record(self, index: int, row: Mapping[str, Any]) -> None:
        """Write slide ``index``'s ``result.json`` (last of its outputs): its row, and what makes it
        reusable."""
        folder = self.folder(index)
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        record = {
            "row": dict(row),
            "slide": slide_identity(str(self.slides[index]["image"])),
            "model": self.fingerprint,
            "options": self.options,
            "by": f"{socket.gethostname()}:{os.getpid()}",
        }
        with atomic_path(folder / RESULT_FILE) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")

    def rows(self, wait: bool = True, skip: Collection[int] = ()) -> list[dict[str, Any]]:
        """A row per slide of the list, in input order: its result, or ``missing`` where it has none (another
        shard's slide not yet done). With ``wait``, slides another run is predicting are waited for, except
        those in ``skip`` (this process's slides that ran out of time, whose threads may still hold them)."""
        out = []
        for index, entry in enumerate(self.slides):
            row = self.done_row(index, reuse=False)
            if row is None and wait and index not in skip:
                with self.claim(index, wait=True):
                    row = self.done_row(index, reuse=False)
            if row is None:
                row = {"image": str(entry["image"]), "status": "missing", "error": "not predicted yet"}
                row["label"] = entry.get("label", "")
            out.append(row)
        return out

    def write_tables(
        self,
        class_names: Sequence[str],
        wait: bool = True,
        skip: Collection[int] = (),
        run: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write ``predictions.csv`` (every slide, input order; a ``risk`` column where the model has a risk
        head) and ``summary.json`` (with ``run``'s figures); returns the summary."""
        rows = self.rows(wait, skip)
        prob_columns = [f"prob_{name}" for name in class_names]
        risk = ["risk"] if any(row.get("risk", "") != "" for row in rows) else []
        columns = [*FIXED_COLUMNS, *prob_columns, *risk, *TIMING_COLUMNS]
        with atomic_path(self.path / "predictions.csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({c: row.get(c, "") for c in columns})
        summary = {**summarise(rows, prob_columns), **dict(run or {})}
        with atomic_path(self.path / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def summarise(rows: Sequence[Mapping[str, Any]], prob_columns: Sequence[str]) -> dict[str, Any]:
    """Counts, seconds per slide, and on labelled slides accuracy, balanced accuracy and AUC."""
    ok = [r for r in rows if r.get("status") == "ok"]
    times = [float(r["total_s"]) for r in ok if r.get("total_s") not in (None, "")]
    summary: dict[str, Any] = {
        "slides": len(rows),
        "ok": len(ok),
        "error": sum(r.get("status") == "error" for r in rows),
        "missing": sum(r.get("status") == "missing" for r in rows),
        "mean_seconds_per_slide": round(float(np.mean(times)), 4) if times else None,
        "median_seconds_per_slide": round(float(np.median(times)), 4) if times else None,
    }
    labelled = [r for r in ok if str(r.get("label", "")) != ""]
    if labelled and all(c in r for r in labelled for c in prob_columns):
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
    return summary


def merge(path: str | os.PathLike) -> dict[str, Any]:
    """``smt-monai merge OUT``: one ``predictions.csv`` and ``summary.json`` from the per-slide results every
    shard wrote into ``OUT`` (slides not done are ``missing`` rows).

    Raises:
        OutputError: ``OUT`` holds no slide list (no shard ran there).
    """
    path = Path(path)
    listed = path / SLIDES_FILE
    if not listed.is_file():
        raise OutputError(f"{path}: no {SLIDES_FILE}; run the shards there first")
    images = json.loads(listed.read_text())
    records = []
    for name in safe_names(images):
        try:
            records.append(json.loads((path / name / RESULT_FILE).read_text()))
        except (OSError, ValueError):
            records.append(None)
    done = [r for r in records if r]
    if not done:
        raise OutputError(f"{path}: no slide has a result yet")
    slides = [{"image": image, **_label(record)} for image, record in zip(images, records)]
    folder = OutputFolder(path, slides, done[0]["model"], done[0]["options"])
    class_names = [c.removeprefix("prob_") for c in done[0]["row"] if c.startswith("prob_")]
    return folder.write_tables(class_names, wait=False)


def _label(record: Mapping[str, Any] | None) -> dict[str, Any]:
    label = (record or {}).get("row", {}).get("label", "")
    return {"label": label} if label != "" else {}
