"""Per-slide dataset items: the layer-1 view of each slide (its tissue square, read once and cached).

Layer 1 always sees the same image of a slide, so :class:`LoadLayer1d` is deterministic and MONAI's
``CacheDataset`` keeps its output in memory for the whole run; only the focused regions of layers 2 and 3
are read per iteration. A slide that cannot be read becomes an item with an ``error`` message and a blank
image instead of an exception, so one broken slide never aborts a batch: engines skip such items and log
them by name.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset
from monai.transforms import MapTransform

from smt_monai.data.errors import SlideReadError
from smt_monai.data.geometry import square_around
from smt_monai.data.regions import SlideCache, read_boxes
from smt_monai.data.slide import slide_id_of
from smt_monai.data.tissue import tissue_bbox


class LoadLayer1d(MapTransform):
    """Read layer 1's input: the square around the slide's tissue, at ``read_size`` pixels.

    Adds ``box`` (level-0 ``(x, y, size)`` float64), ``slide_id``, ``path``, ``backend``, ``dimensions``
    (level-0 width, height), ``mpp`` (NaN when unknown), ``error`` ("" when fine), and replaces ``image`` by a
    ``(3, read_size, read_size)`` uint8 tensor (white when the slide failed).

    Args:
        read_size: layer input side, the network's ``read_size`` (``grid * patch_size // stem_pool``).
        backend: slide backend (``auto``, ``cucim``, ``openslide``, ``tifffile``).
        keys: the key holding the slide path.
        cache: open slides shared with the region reader (default: its own).
    """

    def __init__(
        self,
        read_size: int,
        backend: str = "auto",
        keys: Sequence[Hashable] = ("image",),
        cache: SlideCache | None = None,
    ) -> None:
        super().__init__(keys)
        self.read_size = read_size
        self.cache = cache if cache is not None else SlideCache(backend, capacity=2)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            d.update(
                path=path,
                slide_id=slide_id_of(path),
                error="",
                backend="",
                dimensions=(0, 0),
                mpp=float("nan"),
            )
            try:
                slide = self.cache.get(path)
                box = square_around(tissue_bbox(slide))
                image = read_boxes(slide, box[None], self.read_size)[0]
                d.update(backend=slide.backend, dimensions=slide.dimensions, mpp=slide.mpp or float("nan"))
            except SlideReadError as exc:
                d["error"] = str(exc)
                box = np.zeros(3)
                image = np.full((self.read_size, self.read_size, 3), 255, dtype=np.uint8)
            d[key] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
            d["box"] = torch.as_tensor(box, dtype=torch.float64)
        d.setdefault("label", -1)
        d["annotation"] = str(d.get("annotation") or "")
        return d


def layer1_dataset(
    entries: Sequence[Mapping[str, Any]],
    read_size: int,
    backend: str = "auto",
    cache: bool = True,
    num_workers: int = 2,
    progress: bool = True,
    slide_cache: SlideCache | None = None,
) -> CacheDataset:
    """A dataset of layer-1 items; with ``cache`` every thumbnail is read once (``num_workers`` threads).

    ``slide_cache`` (shared with the engine's region reader) keeps slides open between the two.
    """
    return CacheDataset(
        data=list(entries),
        transform=LoadLayer1d(read_size, backend, cache=slide_cache),
        cache_rate=1.0 if cache else 0.0,
        num_workers=num_workers,
        progress=progress,
    )
