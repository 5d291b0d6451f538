"""What each SMT layer sees of a slide, in micrometres (method-notes, "Geometry").

A model fixes the resolution of every layer by one number, ``layer3_mpp``: the um/px of the images layer 3
reads (``read_size`` px, already pooled by the patch stem); layer ``l`` reads at ``layer3_mpp *
grid**(3 - l)``, since each layer's region is one patch of the previous layer's. Layer 1's field of view is
then a square of fixed physical side, ``grid**2 * read_size * layer3_mpp`` um, whatever the scanner and
the specimen: one field centred on tissue smaller than that, several fields (``layer1_fields``) over a
larger specimen or several sections. The paper's preset (grid 8, 2048 px inputs read at 512) at
``layer3_mpp = 1`` sees layer 3 at 1 um/px as read, 0.25 um/px (40x) before the stem's 4x pooling, and
layer 1 at 64 um/px as read (16 um/px, 0.625x, before pooling), over a 32.8 mm field.

``geometry: tissue`` keeps the tissue-relative mode instead: layer 1 sees the square around all the tissue,
so a layer's um/px follows the specimen's size (a model trained on 16 mm specimens sees cells at half the
size on 8 mm ones). It needs no mpp and is recorded with the model.

The physical mode needs the scan's mpp. It comes from the file (``Slide.mpp``); a value outside
``PLAUSIBLE_MPP`` (e.g. 350 um/px from a 72-dpi resolution tag) is not trusted; where none is usable the
user states the scanner's (``default_mpp``), or the slide is refused with a line that says both ways on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from smt_monai.data.errors import OptionError, SlideReadError
from smt_monai.data.geometry import layer1_fields, square_around
from smt_monai.data.slide import Slide
from smt_monai.data.tissue import TissueMap, tissue_bbox, tissue_components

logger = logging.getLogger(__name__)

GEOMETRIES = ("physical", "tissue")
PLAUSIBLE_MPP = (0.05, 20.0)
"""Level-0 um/px a whole-slide scan can have (100x oil to 0.5x); other values are tags without meaning."""


@dataclass(frozen=True)
class LayerScale:
    """How a model's layers see a slide: its grid, read size, geometry mode and layer-3 resolution.

    Args:
        grid: patches per side of a layer input.
        read_size: pixels per side of each region read.
        geometry: ``"physical"`` (fixed um/px per layer) or ``"tissue"`` (layer 1 on the tissue's square).
        layer3_mpp: um/px of layer 3's reads (physical mode).

    Raises:
        ValueError: unknown ``geometry`` or a non-positive ``layer3_mpp``.
    """

    grid: int
    read_size: int
    geometry: str = "physical"
    layer3_mpp: float = 1.0

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {self.geometry!r}")
        if not self.layer3_mpp > 0:
            raise ValueError(f"layer3_mpp must be positive, got {self.layer3_mpp}")

    @classmethod
    def of(cls, network: Any) -> LayerScale:
        """The scale of an ``SMT`` network or its TorchScript export (its ``grid``, ``read_size``,
        ``geometry`` and ``layer3_mpp`` attributes)."""
        return cls(
            int(network.grid), int(network.read_size), str(network.geometry), float(network.layer3_mpp)
        )

    def layer_mpp(self, layer: int) -> float:
        """um/px of layer ``layer``'s reads (physical mode)."""
        return self.layer3_mpp * self.grid ** (3 - layer)

    @property
    def field_um(self) -> float:
        """Side of a layer-1 field of view in um (physical mode)."""
        return self.grid**2 * self.read_size * self.layer3_mpp

    def layer1_boxes(
        self, slide: Slide, default_mpp: float | None = None, found: TissueMap | None = None
    ) -> np.ndarray:
        """Layer 1's regions of ``slide``: ``(F, 3)`` level-0 boxes.

        Physical mode: fields of ``field_um`` covering the tissue sections (``tissue_components``,
        pen marks and debris left out); tissue mode: the one square around all the tissue. ``found``: the
        slide's tissue map (:func:`tissue_map` at the mpp the slide is read at), where the caller has it.

        Raises:
            SlideReadError: not a brightfield slide, or (physical mode) no usable mpp.
        """
        if self.geometry == "tissue":
            return square_around(tissue_bbox(slide, known_mpp(slide, default_mpp), found))[None]
        mpp = scan_mpp(slide, default_mpp)
        return layer1_fields(np.array(tissue_components(slide, mpp, found)), self.field_um / mpp)


def plausible(mpp: float | None) -> bool:
    """Whether ``mpp`` (um/px) can be a whole-slide scan's level-0 resolution."""
    return mpp is not None and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]


def check_default_mpp(default_mpp: float | None) -> float | None:
    """``default_mpp`` (the user's level-0 um/px for slides whose file holds none) if a scan can have it.

    Raises:
        OptionError: it is outside ``PLAUSIBLE_MPP`` (an OptionError is a ValueError).
    """
    if default_mpp is not None and not plausible(default_mpp):
        raise OptionError(
            f"default_mpp {default_mpp:g}: not a scan's level-0 um/px (0.25 for 40x, 0.5 for 20x; "
            f"{PLAUSIBLE_MPP[0]:g} to {PLAUSIBLE_MPP[1]:g})"
        )
    return default_mpp


def known_mpp(slide: Slide, default_mpp: float | None = None) -> float | None:
    """:func:`scan_mpp`, or None where neither the file nor ``default_mpp`` gives a usable one."""
    try:
        return scan_mpp(slide, default_mpp)
    except SlideReadError:
        return None


def scan_mpp(slide: Slide, default_mpp: float | None = None) -> float:
    """The slide's level-0 um/px: from the file when it is plausible, else ``default_mpp``.

    Raises:
        SlideReadError: neither is usable; the message names the two ways on.
    """
    if plausible(slide.mpp):
        assert slide.mpp is not None
        return float(slide.mpp)
    if check_default_mpp(default_mpp) is not None:
        return float(default_mpp)
    found = "holds no resolution" if slide.mpp is None else f"states {slide.mpp:g} um/px, which no scan has"
    raise SlideReadError(
        slide.path,
        f"the file {found}; give the scanner's with --default_mpp (0.25 for 40x, 0.5 for 20x) or use "
        "a model trained with geometry: tissue",
    )
