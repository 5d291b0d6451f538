"""Where the cascade looked on an annotated slide, and what picking patches at random would have given.

Three focus measures are taken on positive annotated slides (method-notes "Metrics"; the paper's "over
80%" focusing accuracy, Sec. 3.3): ``hit``, some layer-3 region is on tumour; ``top1``, the layer-3 region
with the highest P(positive) is; ``regions``, the share of the ``K^2`` layer-3 regions that are. A region
is on tumour when its tumour-overlap fraction reaches the layer-3 ``label_overlap``, the fraction from which
training labels it positive.

Each comes with its chance level: its expected value when every layer picks ``K`` tissue patches at random
(``select_regions``' rule: where a region has fewer than ``K`` tissue patches, all of them and the rest at
random among the others), with the same ``K`` on the same slide. It is computed exactly, not sampled, over
every patch the cascade could pick after layer 1 (:class:`SlidePatches`): the slide's real layer-1 fields,
their patches and the patches of those, with the annotation's overlap of each. Which patches hold tissue
is judged, with ``patch_tissue``, on layer 1's images for both layers: layer 1's patches exactly as the
cascade judges them, layer 2's on the ``grid`` x ``grid`` sub-squares of layer 1's patches (8 to 16 px
each in the paper and CPU recipes), since the layer-2 images of regions the cascade did not pick are never
read. ``top1``'s chance is that of ``regions``: with random picks the most probable region is any of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from scipy.special import comb

from smt_monai.cascade.prediction import SlidePrediction
from smt_monai.data.annotations import TumourAnnotation
from smt_monai.data.geometry import patch_grid_boxes
from smt_monai.data.tissue import patch_tissue
from smt_monai.focus.selection import reaches_overlap

TUMOUR = "tumour"
MIMIC = "mimic"
"""The annotation classes a :class:`SlidePatches` may measure: tumour (any positive class of the model,
``annotation_classes``) and the benign mimics (``MIMIC_NAMES``)."""


class FocusOutcome(NamedTuple):
    """The focus measures of one slide and their chance levels (NaN where they do not apply: negative or
    unannotated slides)."""

    hit: float = math.nan
    top1: float = math.nan
    regions: float = math.nan
    hit_chance: float = math.nan
    top1_chance: float = math.nan
    regions_chance: float = math.nan


@dataclass
class SlidePatches:
    """Every patch a slide's cascade can pick after layer 1, and what lies under it.

    Level 0 holds layer 1's patches (the possible layer-2 regions), ``P = fields * grid**2`` of them, fields
    in order and patches row-major; level 1 their patches (the possible layer-3 regions), ``grid**2`` each.

    Attributes:
        grid: patches per side of a layer input.
        boxes: level-0 boxes ``(P, 3)`` and ``(P, grid**2, 3)``.
        tissue: ``(P,)`` and ``(P, grid**2)`` bool, the patches that hold tissue (see the module docstring).
        overlap: per annotation class (``tumour``, ``mimic``), the fractions ``(P,)`` and ``(P, grid**2)`` of
            each patch the class covers.
    """

    grid: int
    boxes: tuple[np.ndarray, np.ndarray]
    tissue: tuple[np.ndarray, np.ndarray]
    overlap: dict[str, tuple[np.ndarray, np.ndarray]]

    @classmethod
    def of(
        cls,
        fields: np.ndarray,
        field_boxes: np.ndarray,
        grid: int,
        annotations: Mapping[str, TumourAnnotation],
    ) -> SlidePatches:
        """The patches of a slide's layer-1 ``fields`` (``(F, side, side, 3)`` uint8, as
        ``SlidePrediction.fields``) whose level-0 boxes are ``field_boxes`` ``(F, 3)``, with the overlap of
        each of ``annotations`` (class name to its polygons)."""
        images = torch.as_tensor(np.ascontiguousarray(fields)).permute(0, 3, 1, 2)
        count = grid * grid
        coarse = patch_tissue(images, grid).numpy().reshape(-1)
        # the (grid**2)-grid of a field, as [field, row, sub-row, column, sub-column] -> [patch, sub-patch]
        fine = patch_tissue(images, count).numpy().reshape(-1, grid, grid, grid, grid)
        fine = fine.transpose(0, 1, 3, 2, 4).reshape(-1, count)
        first = patch_grid_boxes(np.asarray(field_boxes, dtype=np.float64).reshape(-1, 3), grid).reshape(
            -1, 3
        )
        second = patch_grid_boxes(first, grid)
        overlap = {}
        for name, annotation in annotations.items():
            inner = np.zeros((len(first), count))
            near = annotation.intersects(first)
            if near.any():
                inner[near] = annotation.overlap_fraction(second[near].reshape(-1, 3)).reshape(-1, count)
            overlap[name] = (annotation.overlap_fraction(first), inner)
        return cls(grid, (first, second), (coarse, fine), overlap)

    def locate(self, prediction: SlidePrediction) -> tuple[np.ndarray, np.ndarray]:
        """Where the picks of ``prediction`` (from the same fields) lie: ``(n2,)`` level-0 indices of its
        layer-2 regions, and ``(n3, 2)`` (level-0, level-1) indices of its layer-3 regions."""
        fields, second, third = prediction.boxes[:3]
        count = self.grid * self.grid
        parent = prediction.parent[1]
        at_first = parent * count + _patch_of(fields[parent], second, self.grid)
        owner = prediction.parent[2]
        at_second = _patch_of(second[owner], third, self.grid)
        return at_first, np.stack([at_first[owner], at_second], axis=1)


def _patch_of(parents: np.ndarray, children: np.ndarray, grid: int) -> np.ndarray:
    """Row-major index of each child box's patch in its parent box (boxes ``(n, 3)``)."""
    step = parents[:, 2] / grid
    column = np.rint((children[:, 0] - parents[:, 0]) / step).astype(np.int64)
    row = np.rint((children[:, 1] - parents[:, 1]) / step).astype(np.int64)
    return row * grid + column


def pick_probability(valid: np.ndarray, k: int) -> np.ndarray:
    """``(R, n)``: the probability that each of a row's ``n`` patches is among ``k`` picked at random, valid
    (tissue) patches first: ``k`` of them uniformly, or all of them and the rest uniformly from the others."""
    valid = np.asarray(valid, dtype=bool)
    count = valid.sum(axis=1, keepdims=True)
    from_valid = np.minimum(k, count)
    return np.where(
        valid,
        from_valid / np.maximum(count, 1),
        (k - from_valid) / np.maximum(valid.shape[1] - count, 1),
    )


def _elementary(values: np.ndarray, k: int) -> np.ndarray:
    """``(R, k + 1)``: the elementary symmetric polynomials ``e_0 .. e_k`` of each row of ``values``."""
    out = np.zeros((values.shape[0], k + 1))
    out[:, 0] = 1.0
    for column in values.T:
        out[:, 1:] = out[:, 1:] + column[:, None] * out[:, :-1]
    return out


def random_pick_product(values: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """``(R,)``: the expected product of ``values`` over ``k`` patches of each row picked at random, valid
    patches first (as :func:`pick_probability`). Over a uniform ``k``-subset of ``n`` values that is
    ``e_k / C(n, k)``; a row with ``m < k`` valid patches takes the product of all of them times the same
    over ``k - m`` of the others."""
    values = np.asarray(values, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    inside = _elementary(np.where(valid, values, 0.0), k)
    outside = _elementary(np.where(valid, 0.0, values), k)
    count = valid.sum(axis=1)
    rows = np.arange(len(values))
    full = inside[:, k] / np.maximum(comb(count, k), 1.0)
    short = np.minimum(count, k)
    rest = outside[rows, k - short] / comb(valid.shape[1] - count, k - short)
    return np.where(count >= k, full, inside[rows, short] * rest)


def focus_outcome(
    prediction: SlidePrediction, patches: SlidePatches, num_focus: int, label_overlap: float
) -> FocusOutcome:
    """The focus measures of a positive annotated slide's ``prediction`` and their chance levels, with
    ``num_focus`` picks per region at random and regions on tumour from ``label_overlap`` (layer 3's)."""
    on = reaches_overlap(patches.overlap[TUMOUR][1], label_overlap)
    _, picks = patches.locate(prediction)
    hits = on[picks[:, 0], picks[:, 1]]
    positive = prediction.region_probs[2][:, 1:].sum(axis=1)
    first, second = (
        pick_probability(valid, num_focus) for valid in (patches.tissue[0][None], patches.tissue[1])
    )
    regions = float((first[0] * (second * on).sum(axis=1)).sum()) / num_focus**2
    missed = random_pick_product(1.0 - on, patches.tissue[1], num_focus)
    hit = 1.0 - float(random_pick_product(missed[None], patches.tissue[0][None], num_focus)[0])
    return FocusOutcome(
        float(hits.any()), float(hits[int(np.argmax(positive))]), float(hits.mean()), hit, regions, regions
    )
