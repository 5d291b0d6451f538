"""The cascade's I/O: next-layer regions of a batch of slides, read in parallel; tumour overlap of regions.

The engines hand :class:`BatchRegionReader` to the cascade (``cascade_step`` in training,
``predict_cascade`` in validation and inference). It reads every region through
:func:`smt_monai.data.read_boxes`, one slide per thread, so the reads of the batch's slides overlap.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from smt_monai.data.annotations import TumourAnnotation
from smt_monai.data.regions import SlideCache, iter_boxes
from smt_monai.networks.normalization import normalize_he


class BatchRegionReader:
    """Reads level-0 boxes of the slides of one batch as uint8 (or normalised) images of ``out_side``.

    Args:
        out_side: layer input side, the network's ``read_size`` (``grid * patch_size // stem_pool``).
        backend: slide backend.
        num_workers: slides read at once (each by one thread; a single slide uses all of them).
        chunk_size: regions held in memory at once per slide while reading.
        cache: open slides shared with other readers (default: its own).
    """

    def __init__(
        self,
        out_side: int,
        backend: str = "auto",
        num_workers: int = 2,
        chunk_size: int = 16,
        cache: SlideCache | None = None,
    ) -> None:
        self.out_side = out_side
        self.num_workers = max(1, num_workers)
        self.chunk_size = chunk_size
        self.cache = cache if cache is not None else SlideCache(backend, capacity=16)
        self.paths: Sequence[str] = ()

    def bind(self, paths: Sequence[str]) -> BatchRegionReader:
        """Set the batch's slide paths (``slide_index`` refers to them)."""
        self.paths = list(paths)
        return self

    def _read_slide(self, slide: int, rows: np.ndarray, boxes: np.ndarray, workers: int) -> Iterator:
        opened = self.cache.get(self.paths[slide])
        for idx, images in iter_boxes(opened, boxes[rows], self.out_side, workers, self.chunk_size):
            yield rows[idx], torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

    def chunks(self, slide_index: np.ndarray, boxes: np.ndarray) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``(row indices, (n, 3, side, side) uint8)`` chunks covering all rows (the ``RegionSource`` API).

        One slide's chunks are yielded as they are read, so a consumer (through ``prefetch``) computes on
        one chunk while the next is read; several slides are read in parallel, one thread each.

        Raises:
            SlideReadError: a slide of the batch failed; its path is in the message.
        """
        slide_index = np.asarray(slide_index)
        boxes = np.asarray(boxes, dtype=np.float64)
        slides = list(dict.fromkeys(slide_index.tolist()))
        per_slide = {s: np.flatnonzero(slide_index == s) for s in slides}
        if len(slides) == 1:
            yield from self._read_slide(slides[0], per_slide[slides[0]], boxes, self.num_workers)
            return
        workers_each = max(1, self.num_workers // len(slides))
        with ThreadPoolExecutor(min(self.num_workers, len(slides))) as pool:
            results = pool.map(lambda s: list(self._read_slide(s, per_slide[s], boxes, workers_each)), slides)
            for result in results:
                yield from result

    def __call__(
        self, slide_index: torch.Tensor | np.ndarray, boxes: torch.Tensor | np.ndarray
    ) -> torch.Tensor:
        """All rows as one normalised float tensor, in row order (the ``RegionReader`` API of training)."""
        slide_index = np.asarray(torch.as_tensor(slide_index).cpu())
        boxes = np.asarray(torch.as_tensor(boxes).cpu())
        out = torch.empty(len(boxes), 3, self.out_side, self.out_side, dtype=torch.uint8)
        for rows, images in self.chunks(slide_index, boxes):
            out[torch.as_tensor(rows)] = images
        return normalize_he(out)

    def close(self) -> None:
        self.cache.close()


class AnnotationOverlap:
    """Tumour-overlap fraction of regions, from each slide's annotation file (NaN without one).

    Annotations are loaded once per file and kept.
    """

    def __init__(self) -> None:
        self._loaded: dict[str, TumourAnnotation] = {}
        self.paths: Sequence[str] = ()

    def bind(self, annotation_paths: Sequence[str]) -> AnnotationOverlap:
        self.paths = list(annotation_paths)
        return self

    def annotation(self, slide: int) -> TumourAnnotation | None:
        path = self.paths[slide] if slide < len(self.paths) else ""
        if not path:
            return None
        if path not in self._loaded:
            self._loaded[path] = TumourAnnotation.from_file(path)
        return self._loaded[path]

    def __call__(
        self, slide_index: torch.Tensor | np.ndarray, boxes: torch.Tensor | np.ndarray
    ) -> torch.Tensor:
        slide_index = np.asarray(torch.as_tensor(slide_index).cpu())
        boxes = np.asarray(torch.as_tensor(boxes).cpu(), dtype=np.float64)
        out = np.full(len(boxes), math.nan)
        for slide in np.unique(slide_index):
            annotation = self.annotation(int(slide))
            if annotation is not None:
                rows = np.flatnonzero(slide_index == slide)
                out[rows] = annotation.overlap_fraction(boxes[rows])
        return torch.from_numpy(out)
