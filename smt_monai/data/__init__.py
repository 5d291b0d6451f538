"""Slides: opening with backend fallback, tissue box, nested-region geometry, region reads, cohorts.

The names below load their module on first use, so that importing a light submodule (the synthetic-slide
writer's worker processes import :mod:`smt_monai.data.synth`) does not pull in torch, MONAI and the slide
readers.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "AnnotationOverlap": "annotations",
    "TumourAnnotation": "annotations",
    "DatalistError": "datalist",
    "class_names": "datalist",
    "load_datalist": "datalist",
    "load_slide_list": "datalist",
    "LoadLayer1d": "dataset",
    "collate_views": "dataset",
    "view_list": "dataset",
    "layer1_dataset": "dataset",
    "SlideReadError": "errors",
    "box_to_xyxy": "geometry",
    "layer1_fields": "geometry",
    "child_boxes": "geometry",
    "patch_grid_boxes": "geometry",
    "region_key": "geometry",
    "square_around": "geometry",
    "LayerScale": "magnification",
    "ReadSlideRegions": "regions",
    "RegionReader": "regions",
    "ReadSlideRegionsd": "regions",
    "SlideCache": "regions",
    "iter_boxes": "regions",
    "read_boxes": "regions",
    "BACKENDS": "slide",
    "Slide": "slide",
    "open_slide": "slide",
    "check_brightfield": "tissue",
    "patch_tissue": "tissue",
    "tissue_bbox": "tissue",
    "tissue_components": "tissue",
    "tissue_map": "tissue",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"smt_monai.data.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'smt_monai.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
