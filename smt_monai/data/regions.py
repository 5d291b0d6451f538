"""Reading SMT's square regions: the right pyramid level, area resize, white padding, batched and parallel.

Every pixel a layer sees comes through :func:`iter_boxes` (one slide) or :class:`RegionReader` (the regions of
several slides, as the cascade reads them). A region is a level-0 box ``(x, y, size)`` (see
:mod:`smt_monai.data.geometry`); it is read at the coarsest level whose resolution still suffices for a
``read_size`` x ``read_size`` output (never level 0 for a low-magnification view), then area-resized.
Regions of one layer share a size, so they are read in one batched backend call (cuCIM's multi-location
``read_region``) or a thread pool, ``chunk_size`` at a time so that memory stays bounded.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Transform
from PIL import Image

from smt_monai.data.slide import Slide, open_slide


def plan_read(slide: Slide, box: np.ndarray, read_size: int) -> tuple[int, tuple[int, int], int]:
    """Level, level-0 location and side in level pixels of the read that serves ``box`` at ``read_size``."""
    x, y, size = (float(v) for v in box)
    level = slide.best_level(size / read_size)
    ds = slide.level_downsamples[level]
    side = max(1, int(round(size / ds)))
    return level, (int(np.floor(x)), int(np.floor(y))), side


def _block_factor(side: int, read_size: int) -> int:
    """The blocks a ``side``-pixel read is averaged over before its box-filter resize to ``read_size``: a big
    reduction is mostly whole-block averages (``Image.reduce``, much cheaper than a resampling filter of the
    same support, done while reading by :meth:`Slide.read_regions`), the small remainder resampled."""
    return max(1, side // read_size)


def _resize(region: np.ndarray, read_size: int) -> np.ndarray:
    """Resize a square region (already block-averaged) to ``read_size``: box filter, bilinear to enlarge."""
    if region.shape[0] == read_size and region.shape[1] == read_size:
        return region
    image = Image.fromarray(region)
    if region.shape[0] < read_size:
        return np.asarray(image.resize((read_size, read_size), Image.Resampling.BILINEAR))
    return np.asarray(image.resize((read_size, read_size), Image.Resampling.BOX))


def iter_boxes(
    slide: Slide,
    boxes: np.ndarray,
    read_size: int,
    num_workers: int = 2,
    chunk_size: int = 16,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Read ``boxes`` chunk by chunk; yields ``(indices, images)`` with images ``(n, out, out, 3)`` uint8.

    Boxes that share a level and read size are batched into one backend call. At most ``chunk_size`` raw
    regions are held at once.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 3)
    plans = [plan_read(slide, box, read_size) for box in boxes]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (level, _, side) in enumerate(plans):
        groups.setdefault((level, side), []).append(i)
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        for (level, side), members in groups.items():
            for start in range(0, len(members), chunk_size):
                chunk = members[start : start + chunk_size]
                locations = [plans[i][1] for i in chunk]
                factor = _block_factor(side, read_size)
                raw = slide.read_regions(locations, level, (side, side), num_workers, factor)
                images = np.stack(list(pool.map(lambda r: _resize(r, read_size), raw)))
                yield np.asarray(chunk), images


def read_boxes(
    slide: Slide, boxes: np.ndarray, read_size: int, num_workers: int = 2, chunk_size: int = 16
) -> np.ndarray:
    """All ``boxes`` as one ``(N, read_size, read_size, 3)`` uint8 array, in the order given."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 3)
    out = np.empty((len(boxes), read_size, read_size, 3), dtype=np.uint8)
    for indices, images in iter_boxes(slide, boxes, read_size, num_workers, chunk_size):
        out[indices] = images
    return out


class SlideCache:
    """Keeps the most recently used slides open, so repeated reads of one slide do not reopen it."""

    def __init__(self, backend: str = "auto", capacity: int = 8) -> None:
        self.backend = backend
        self.capacity = capacity
        self._slides: dict[str, Slide] = {}
        self._lock = threading.Lock()

    def get(self, path: str) -> Slide:
        """The open slide at ``path``, opening it (and closing the least recently used) when needed.

        Raises:
            SlideReadError: the slide cannot be opened.
        """
        with self._lock:
            slide = self._slides.pop(path, None)
        if slide is None:
            slide = open_slide(path, self.backend)
        with self._lock:
            self._slides[path] = slide
            while len(self._slides) > self.capacity:
                self._slides.pop(next(iter(self._slides))).close()
        return slide

    def close(self) -> None:
        with self._lock:
            for slide in self._slides.values():
                slide.close()
            self._slides.clear()


Chunks = Iterator[tuple[np.ndarray, torch.Tensor]]
"""``(row indices, (n, 3, read_size, read_size) uint8 images)`` pieces of a set of regions, in any order."""


class RegionReader:
    """Reads the regions of several slides at once: the cascade's reads of one layer.

    A row ``i`` is the level-0 box ``boxes[i]`` of the slide ``paths[slide_index[i]]``. Rows of one slide
    are read by :func:`iter_boxes`; several slides are read in parallel, one thread each, so the reads of a
    batch's slides overlap.

    Args:
        read_size: side of each image read (the network's ``read_size``).
        backend: slide backend.
        num_workers: threads reading (a single slide uses all of them).
        chunk_size: regions held in memory at once per slide while reading.
        cache: open slides shared with other readers (default: its own).
    """

    def __init__(
        self,
        read_size: int,
        backend: str = "auto",
        num_workers: int = 2,
        chunk_size: int = 16,
        cache: SlideCache | None = None,
    ) -> None:
        self.read_size = read_size
        self.num_workers = max(1, num_workers)
        self.chunk_size = chunk_size
        self.cache = cache if cache is not None else SlideCache(backend, capacity=16)

    def _slide_chunks(self, path: str, rows: np.ndarray, boxes: np.ndarray, workers: int) -> Chunks:
        slide = self.cache.get(path)
        for idx, images in iter_boxes(slide, boxes[rows], self.read_size, workers, self.chunk_size):
            yield rows[idx], torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

    def chunks(self, paths: Sequence[str], slide_index: np.ndarray, boxes: np.ndarray) -> Chunks:
        """Chunks covering every row: one slide's as they are read (so a consumer computes on one chunk while
        the next is read), several slides' in parallel.

        Raises:
            SlideReadError: a slide failed; its path is in the message.
        """
        slide_index = np.asarray(slide_index)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 3)
        slides = list(dict.fromkeys(slide_index.tolist()))
        rows = {s: np.flatnonzero(slide_index == s) for s in slides}
        if len(slides) == 1:
            yield from self._slide_chunks(paths[slides[0]], rows[slides[0]], boxes, self.num_workers)
            return
        workers = max(1, self.num_workers // len(slides))
        with ThreadPoolExecutor(min(self.num_workers, len(slides))) as pool:
            read = pool.map(lambda s: list(self._slide_chunks(paths[s], rows[s], boxes, workers)), slides)
            for chunks in read:
                yield from chunks

    def read(self, paths: Sequence[str], slide_index: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
        """Every row as one ``(M, 3, read_size, read_size)`` uint8 tensor, in row order."""
        out = torch.empty(len(boxes), 3, self.read_size, self.read_size, dtype=torch.uint8)
        for rows, images in self.chunks(paths, slide_index, boxes):
            out[torch.as_tensor(rows)] = images
        return out

    def close(self) -> None:
        self.cache.close()


class ReadSlideRegions(Transform):
    """Read level-0 boxes of a slide as channel-first uint8 images of ``read_size`` pixels.

    Args:
        read_size: side of each output image (a layer's input side, the network's ``read_size``).
        backend: slide backend (``auto``, ``cucim``, ``openslide``, ``tifffile``).
        num_workers: decoding threads.
    """

    def __init__(self, read_size: int, backend: str = "auto", num_workers: int = 2) -> None:
        if read_size <= 0:
            raise ValueError(f"read_size must be positive, got {read_size}")
        self.read_size = read_size
        self.num_workers = num_workers
        self.cache = SlideCache(backend)

    def __call__(self, slide: Slide | str, boxes: np.ndarray) -> np.ndarray:
        """Returns ``(3, H, W)`` for one box ``(3,)`` and ``(N, 3, H, W)`` for boxes ``(N, 3)``."""
        slide = self.cache.get(str(slide)) if not isinstance(slide, Slide) else slide
        boxes = np.asarray(boxes, dtype=np.float64)
        images = read_boxes(slide, boxes, self.read_size, self.num_workers)
        images = np.moveaxis(images, -1, 1)
        return images[0] if boxes.ndim == 1 else images


class ReadSlideRegionsd(MapTransform):
    """Dictionary wrapper of :class:`ReadSlideRegions`: replaces each slide path key by its region images.

    Args:
        keys: keys holding slide paths (or opened slides).
        box_key: key holding the level-0 box ``(3,)`` or boxes ``(N, 3)``.
        read_size, backend, num_workers: as :class:`ReadSlideRegions`.
    """

    def __init__(
        self,
        keys: Sequence[Hashable] | Hashable,
        box_key: str,
        read_size: int,
        backend: str = "auto",
        num_workers: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.box_key = box_key
        self.reader = ReadSlideRegions(read_size, backend, num_workers)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.reader(d[key], d[self.box_key])
        return d
