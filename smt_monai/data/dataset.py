"""Per-slide dataset items: the layer-1 view of each slide (its fields of view, read once and cached).

Layer 1 always sees the same images of a slide, so :class:`LoadLayer1d` is deterministic and MONAI's
``CacheDataset`` keeps its output in memory for the whole run; only the focused regions of layers 2 and 3
are read per iteration. A slide that cannot be read becomes an item with an ``error`` message and a blank
image instead of an exception, so one broken slide never aborts a batch: engines skip such items and log
them by name. A slide has one or more layer-1 fields (``smt_monai.data.magnification``); :func:`collate_views`
puts the fields of a batch's slides side by side.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset
from monai.data.utils import list_data_collate
from monai.transforms import MapTransform

from smt_monai.data.errors import SlideReadError
from smt_monai.data.magnification import LayerScale, known_mpp, plausible, scan_mpp
from smt_monai.data.regions import SlideCache, read_boxes
from smt_monai.data.slide import slide_id_of
from smt_monai.data.tissue import tissue_map

logger = logging.getLogger(__name__)

VIEW_KEYS = ("image", "box")
"""The keys of a layer-1 view that hold one row per field."""


class LoadLayer1d(MapTransform):
    """Read layer 1's input: the slide's fields of view (``LayerScale.layer1_boxes``) at ``read_size`` px.

    Adds ``box`` (``(F, 3)`` level-0 ``(x, y, size)`` float64), ``slide_id``, ``path``, ``backend``,
    ``dimensions`` (level-0 width, height), ``mpp`` (the level-0 um/px used, NaN when unknown),
    ``tissue_mm2`` (the tissue's area, 0 on a blank slide, NaN when the mpp is unknown), ``error`` (""
    when fine), and replaces ``image`` by ``(F, 3, read_size, read_size)`` uint8 (one white field when the
    slide failed). A scan coarser than layer 3 needs is read at its finest level, with a warning.

    Args:
        scale: how the model sees a slide (``LayerScale.of(network)``).
        backend: slide backend (``auto``, ``cucim``, ``openslide``, ``tifffile``).
        keys: the key holding the slide path.
        cache: open slides shared with the region reader (default: its own).
        default_mpp: the scanner's level-0 um/px for slides whose file holds none (physical geometry).
    """

    def __init__(
        self,
        scale: LayerScale,
        backend: str = "auto",
        keys: Sequence[Hashable] = ("image",),
        cache: SlideCache | None = None,
        default_mpp: float | None = None,
    ) -> None:
        super().__init__(keys)
        self.scale = scale
        self.default_mpp = default_mpp
        self.cache = cache if cache is not None else SlideCache(backend, capacity=2)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        side = self.scale.read_size
        for key in self.key_iterator(d):
            path = str(d[key])
            d.update(path=path, slide_id=slide_id_of(path), error="", backend="", dimensions=(0, 0))
            d["mpp"] = d["tissue_mm2"] = float("nan")
            try:
                slide = self.cache.get(path)
                found = tissue_map(slide, known_mpp(slide, self.default_mpp))
                boxes = self.scale.layer1_boxes(slide, self.default_mpp, found)
                if found.blank:
                    logger.warning(
                        "%s: no tissue found (a blank or failed scan, or very pale staining); the whole "
                        "slide is read",
                        path,
                    )
                d["tissue_mm2"] = float("nan") if found.area_mm2 is None else found.area_mm2
                images = read_boxes(slide, boxes, side)
                d.update(backend=slide.backend, dimensions=slide.dimensions, mpp=self._mpp(slide))
            except SlideReadError as exc:
                d["error"] = str(exc)
                boxes = np.zeros((1, 3))
                images = np.full((1, side, side, 3), 255, dtype=np.uint8)
            d[key] = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
            d["box"] = torch.as_tensor(boxes, dtype=torch.float64)
        d.setdefault("label", -1)
        d["annotation"] = str(d.get("annotation") or "")
        return d

    def _mpp(self, slide: Any) -> float:
        """The level-0 um/px the slide is read at (NaN when unknown), warning when the scan is coarser than
        layer 3's reads need."""
        if self.scale.geometry == "tissue":
            return float(slide.mpp) if plausible(slide.mpp) else float("nan")
        mpp = scan_mpp(slide, self.default_mpp)
        if mpp > 1.1 * self.scale.layer3_mpp:
            logger.warning(
                "%s: scanned at %.3g um/px, coarser than the %.3g um/px layer 3 reads; its finest level is "
                "enlarged",
                slide.path,
                mpp,
                self.scale.layer3_mpp,
            )
        return mpp


def collate_views(items: Sequence[Mapping[Hashable, Any]]) -> dict[Hashable, Any]:
    """A batch of layer-1 views: the fields of all slides side by side (``image`` ``(F, 3, s, s)``, ``box``
    ``(F, 3)``), ``field_slide`` ``(F,)`` the slide of each field, everything else collated per slide.
    Where some slides give a survival ``time`` and ``event`` and others not, the others get NaN."""
    survival = {} if not any("time" in item for item in items) else {"time": math.nan, "event": math.nan}
    batch = list_data_collate(
        [{**survival, **{k: v for k, v in item.items() if k not in VIEW_KEYS}} for item in items]
    )
    for key in VIEW_KEYS:
        batch[key] = torch.cat([torch.as_tensor(item[key]) for item in items])
    batch["field_slide"] = torch.cat([torch.full((len(item["box"]),), i) for i, item in enumerate(items)])
    return batch


def view_list(items: Sequence[Mapping[Hashable, Any]]) -> list[Mapping[Hashable, Any]]:
    """A batch as the list of its items (the evaluators take slides one by one)."""
    return list(items)


def layer1_dataset(
    entries: Sequence[Mapping[str, Any]],
    scale: LayerScale,
    backend: str = "auto",
    cache: bool = True,
    num_workers: int = 2,
    progress: bool = True,
    slide_cache: SlideCache | None = None,
    default_mpp: float | None = None,
) -> CacheDataset:
    """A dataset of layer-1 items; with ``cache`` every view is read once (``num_workers`` threads).

    ``slide_cache`` (shared with the engine's region reader) keeps slides open between the two.
    """
    return CacheDataset(
        data=list(entries),
        transform=LoadLayer1d(scale, backend, cache=slide_cache, default_mpp=default_mpp),
        cache_rate=1.0 if cache else 0.0,
        num_workers=num_workers,
        progress=progress,
    )
