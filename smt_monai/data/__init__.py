"""Slides: opening with backend fallback, tissue box, nested-region geometry, region reads, cohorts."""

from smt_monai.data.annotations import TumourAnnotation
from smt_monai.data.datalist import DatalistError, load_datalist, load_slide_list
from smt_monai.data.dataset import LoadLayer1d, layer1_dataset
from smt_monai.data.errors import SlideReadError
from smt_monai.data.geometry import box_to_xyxy, child_boxes, patch_grid_boxes, region_key, square_around
from smt_monai.data.regions import ReadSlideRegions, ReadSlideRegionsd, SlideCache, iter_boxes, read_boxes
from smt_monai.data.slide import BACKENDS, Slide, open_slide
from smt_monai.data.tissue import tissue_bbox

__all__ = [
    "BACKENDS",
    "DatalistError",
    "LoadLayer1d",
    "layer1_dataset",
    "load_datalist",
    "load_slide_list",
    "ReadSlideRegions",
    "ReadSlideRegionsd",
    "Slide",
    "SlideCache",
    "SlideReadError",
    "TumourAnnotation",
    "box_to_xyxy",
    "child_boxes",
    "iter_boxes",
    "open_slide",
    "patch_grid_boxes",
    "read_boxes",
    "region_key",
    "square_around",
    "tissue_bbox",
]
