"""The dense baseline SMT is compared against: tile all tissue, encode every tile, attention-MIL.

This is the pipeline most slide classifiers run today (CLAM, MONAI's MIL tutorial, TransMIL): cut the tissue
into ``tile_size`` px tiles, at level 0 or, with ``tile_mpp``, at a fixed um/px on any scanner (as CLAM tiles
at 20x; the counterpart of an SMT model's ``layer3_mpp``), encode each tile with a CNN, pool the tile
features with attention (Ilse et al., 2018) into one slide embedding, classify it. The encoder is MONAI's
ResNet-18 with the standard stride-2 stem (``conv1_t_stride=2``; MONAI's default stride 1 costs four times
as much per tile), initialised at random since nothing can be downloaded. Tiles are read through the
project's own reader (:func:`smt_monai.data.iter_boxes`: the coarsest level fine enough, area-resized), so
both methods pay the same I/O, and the network normalises them with SMT's ``normalize_he``.

Training runs on MONAI's ``SupervisedTrainer`` as MONAI's MIL tutorial does: each step encodes a random bag
of ``bag_size`` tissue tiles of a slide end to end (:class:`LoadTileBagd`). Annotations give the dense model
the supervision they give SMT: with ``guide`` > 0, bags of annotated positive slides are given tiles of the
slide's own class (its tumour, or its worst grade), the counterpart of SMT's annotation-guided focus; with
``tile_weight`` > 0, a tile head is trained on each tile's class (the highest class it overlaps by
``tumour_overlap``, as SMT labels its regions; :class:`DenseMILLoss`), the counterpart of SMT's region labels.
The slide prediction is the attention pooling's, or with ``aggregation: max`` SMT's rule over the tile head
(:func:`~smt_monai.cascade.prediction.aggregate`: the slide is as far up the classes as its furthest tile).
Evaluation (:class:`DenseEvaluator`, a MONAI ``Evaluator``) encodes all tissue tiles of a slide,
``chunk_size`` at a time (reading the next chunk while the current one is encoded), pools once over all
features, and reports through the same slide metrics and ``metrics.json`` as SMT's evaluator
(``bundle/configs/train_dense.yaml``). As SMT's model does, the best validation epoch keeps the decision
threshold its validation split gives and the aggregation it was validated with (:func:`validated_decision`),
so that balanced accuracy on a test split is measured at a threshold chosen without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from ignite.metrics import Metric
from monai.networks.nets import resnet18
from monai.transforms import MapTransform, Randomizable
from PIL import Image
from torch.utils.data import DataLoader

from smt_monai.cascade.prediction import aggregate
from smt_monai.data.annotations import TUMOUR_NAMES, TumourAnnotation, annotation_classes
from smt_monai.data.errors import OptionError, SlideReadError
from smt_monai.data.magnification import known_mpp, scan_mpp
from smt_monai.data.regions import SlideCache, iter_boxes
from smt_monai.data.slide import Slide
from smt_monai.data.tissue import tissue_map
from smt_monai.engines.evaluator import SlideEvaluator, SlideOutcome
from smt_monai.focus.selection import region_class
from smt_monai.handlers.checkpoint import load_trusted
from smt_monai.networks.normalization import normalize_he
from smt_monai.networks.pooling import GatedAttentionPool
from smt_monai.utils import prefetch

logger = logging.getLogger(__name__)

DENSE_AGGREGATIONS = ("attention", "max")
"""How a dense slide prediction comes from its tiles: the attention pooling, or SMT's ``max`` over the tile
head's class probabilities."""


def check_dense_aggregation(aggregation: str) -> str:
    """``aggregation`` if it is one of :data:`DENSE_AGGREGATIONS`, else an OptionError (a ValueError) naming
    them."""
    if aggregation not in DENSE_AGGREGATIONS:
        raise OptionError(f"dense aggregation must be one of {DENSE_AGGREGATIONS}, got {aggregation!r}")
    return aggregation


def validated_decision(path: str, aggregation: str | None = None) -> tuple[str, float]:
    """The aggregation and the decision threshold on P(positive) a dense model file was validated with.

    Training's best epoch saves ``aggregation`` and the ``decision_threshold`` its validation split gave
    (``train_dense.yaml``); a file without them (trained without validation) gives ``attention`` and 0.5. A
    threshold holds only for the aggregation it was chosen with: evaluating by another one gives 0.5, with a
    warning.

    Args:
        path: the model file (loaded with ``weights_only=True``).
        aggregation: the aggregation evaluated with; None: the model's own.

    Raises:
        OptionError: ``aggregation`` is not one of :data:`DENSE_AGGREGATIONS` (checked before the file is
            read).
        CheckpointError: the file is not a trusted model file.
    """
    if aggregation is not None:
        check_dense_aggregation(aggregation)
    saved = load_trusted(path)
    validated = str(saved.get("aggregation", "attention"))
    metrics = saved.get("metrics")
    threshold = metrics.get("decision_threshold") if isinstance(metrics, dict) else None
    aggregation = aggregation or validated
    if threshold is None or not 0.0 <= float(threshold) <= 1.0:
        return aggregation, 0.5
    if aggregation != validated:
        logger.warning(
            "%s: its decision threshold %.3g was validated with %s aggregation; evaluating by %s at 0.5",
            path, float(threshold), validated, aggregation,
        )  # fmt: skip
        return aggregation, 0.5
    return aggregation, float(threshold)


class DenseMIL(nn.Module):
    """ResNet-18 tile encoder, gated-attention MIL pooling (Ilse et al., 2018, Eq. 9) and a tile head.

    Equivalent to ``monai.networks.nets.MILModel(mil_mode="att")`` with this backbone, but split into
    :meth:`encode` and :meth:`pool` so that a slide's tens of thousands of tiles can be encoded in chunks and
    pooled once, which ``MILModel.forward`` (all tiles in one ``(B, N, C, H, W)`` tensor) cannot do. The tile
    head (one linear layer on a tile's features) classifies each tile; it is trained only with
    ``tile_weight`` > 0 and used only by ``aggregation: max``.

    Args:
        num_classes: slide classes (class 0 negative).
        attention_dim: hidden width of the attention network.
    """

    feature_dim = 512

    def __init__(self, num_classes: int = 2, attention_dim: int = 128) -> None:
        super().__init__()
        self.encoder = resnet18(spatial_dims=2, n_input_channels=3, conv1_t_stride=2, feed_forward=False)
        self.pooling = GatedAttentionPool(self.feature_dim, num_classes, attention_dim)
        self.tile_head = nn.Linear(self.feature_dim, num_classes)

    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(n, 512)`` features of tiles ``(n, 3, s, s)`` of 8-bit intensities (``normalize_he`` is applied
        here, the network's one entry)."""
        return self.encoder(normalize_he(tiles).contiguous(memory_format=torch.channels_last))

    def pool(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slide logits ``(1, C)`` and tile attention ``(n,)`` from the features of all its tiles."""
        return self.pooling(features)

    def forward(
        self, bags: torch.Tensor, with_tiles: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, C)`` of bags of tiles ``(B, n, 3, s, s)`` (``MILModel``'s input), or ``(1, C)`` of one
        bag ``(n, 3, s, s)``; with ``with_tiles`` also the tile head's logits ``(B, n, C)``."""
        bags = bags[None] if bags.dim() == 4 else bags
        features = self.encode(bags.flatten(0, 1)).reshape(*bags.shape[:2], self.feature_dim)
        slides = torch.cat([self.pool(bag)[0] for bag in features])
        return (slides, self.tile_head(features)) if with_tiles else slides


class DenseMILLoss(nn.Module):
    """Cross-entropy of the slide logits, plus ``tile_weight`` x the cross-entropy of the tile head over the
    tiles whose class is known (label -1: unknown, a tile of a positive slide without annotation).

    Takes what :func:`prepare_bag_batch` and ``DenseMIL(..., with_tiles=True)`` give: ``(slide logits, tile
    logits)`` and ``(slide labels, tile labels)``.
    """

    def __init__(self, tile_weight: float = 0.0) -> None:
        super().__init__()
        self.tile_weight = tile_weight

    def forward(
        self, pred: tuple[torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        (slide_logits, tile_logits), (labels, tile_labels) = pred, target
        loss = nn.functional.cross_entropy(slide_logits.float(), labels.long().reshape(-1))
        known = tile_labels >= 0
        if self.tile_weight > 0 and bool(known.any()):
            tiles = nn.functional.cross_entropy(tile_logits[known].float(), tile_labels[known].long())
            loss = loss + self.tile_weight * tiles
        return loss


def prepare_bag_batch(
    batchdata: Mapping[str, torch.Tensor],
    device: torch.device | str | None = None,
    non_blocking: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple, dict[str, bool]]:
    """``SupervisedTrainer``'s ``prepare_batch`` for :class:`LoadTileBagd` batches: the bags, the slide and
    tile labels as :class:`DenseMILLoss`'s target, and ``with_tiles=True`` for :class:`DenseMIL`."""

    def to(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, non_blocking=non_blocking, **kwargs)

    target = (to(batchdata["label"]), to(batchdata["tile_label"]))
    return to(batchdata["image"]), target, (), {"with_tiles": True}


def tile_side(
    slide: Slide, tile_size: int, tile_mpp: float | None = None, default_mpp: float | None = None
) -> float:
    """Level-0 side of a ``tile_size`` px tile read at ``tile_mpp`` um/px (None: at level 0, ``tile_size``).

    Raises:
        SlideReadError: ``tile_mpp`` is given and the slide's resolution is unknown (``scan_mpp``).
    """
    if tile_mpp is None:
        return float(tile_size)
    return tile_size * tile_mpp / scan_mpp(slide, default_mpp)


def tile_tissue(
    slide: Slide, tile_size: float, mpp: float | None = None, min_tissue: float = 0.25
) -> np.ndarray:
    """Level-0 boxes ``(N, 3)`` of the grid tiles of side ``tile_size`` (level-0 px, :func:`tile_side`) with
    tissue fraction >= ``min_tissue``.

    The tissue is the one SMT's layer-1 fields cover (:func:`~smt_monai.data.tissue.tissue_map`, ``mpp`` as
    there): marker ink, debris and dust are not tiled, so they never enter a bag or a slide's prediction.
    The mask is area-averaged onto the tile grid.

    Raises:
        SlideReadError: the slide is not brightfield.
    """
    tissue, _, (sx, sy), _ = tissue_map(slide, mpp)
    width, height = slide.dimensions
    cols, rows = int(width // tile_size), int(height // tile_size)
    if cols == 0 or rows == 0:
        return np.zeros((0, 3))
    # the mask's part the full tiles cover (padded where the working image's whole-factor averaging cut
    # the slide's last pixels), averaged per tile
    crop_w, crop_h = max(1, round(cols * tile_size / sx)), max(1, round(rows * tile_size / sy))
    mask = np.pad(tissue, ((0, max(0, crop_h - tissue.shape[0])), (0, max(0, crop_w - tissue.shape[1]))))
    cropped = Image.fromarray(mask[:crop_h, :crop_w].astype(np.float32))
    fraction = np.asarray(cropped.resize((cols, rows), Image.Resampling.BOX))
    ys, xs = np.nonzero(fraction >= min_tissue)
    return np.stack([xs * tile_size, ys * tile_size, np.full(len(xs), tile_size)], axis=1).astype(np.float64)


def slide_tiles(
    slide: Slide, tile_size: int, tile_mpp: float | None = None, default_mpp: float | None = None
) -> tuple[np.ndarray, float]:
    """The slide's tissue tiles (:func:`tile_tissue`) of ``tile_size`` px read at ``tile_mpp`` um/px, and
    their level-0 side (:func:`tile_side`); the slide's mpp sizes the debris filter where it is known."""
    side = tile_side(slide, tile_size, tile_mpp, default_mpp)
    return tile_tissue(slide, side, known_mpp(slide, default_mpp)), side


def read_tiles(
    slide: Slide, boxes: np.ndarray, tile_size: int, num_workers: int = 2, chunk_size: int = 64
) -> Iterator[torch.Tensor]:
    """uint8 tiles ``(n, 3, s, s)`` of ``boxes``, ``chunk_size`` at a time, reading ahead in a thread."""
    chunks = iter_boxes(slide, boxes, tile_size, num_workers, chunk_size)
    for _, images in prefetch(chunks):
        yield torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


@torch.inference_mode()
def predict_dense(
    network: DenseMIL,
    slide: Slide,
    tile_size: int,
    boxes: np.ndarray | None = None,
    num_workers: int = 2,
    chunk_size: int = 64,
    device: torch.device | str = "cpu",
    amp: bool = False,
    tile_mpp: float | None = None,
    default_mpp: float | None = None,
    aggregation: str = "attention",
) -> dict[str, Any]:
    """Encode every tile of ``boxes`` (default: all tissue tiles of ``tile_size`` px at ``tile_mpp``, see
    :func:`tile_side`) and pool them into a slide prediction (``aggregation``: the attention pooling, or
    ``max``, SMT's rule over the tile head's probabilities).

    Returns:
        ``probs`` (C,) numpy, ``tiles`` encoded, ``read_s`` (waiting for tiles) and ``compute_s`` seconds.
    """
    check_dense_aggregation(aggregation)
    device = torch.device(device)
    if boxes is None:
        boxes, _ = slide_tiles(slide, tile_size, tile_mpp, default_mpp)
    chunks = []
    read_s = compute_s = 0.0
    tiles = read_tiles(slide, boxes, tile_size, num_workers, chunk_size)
    while True:
        start = time.perf_counter()
        chunk = next(tiles, None)
        read_s += time.perf_counter() - start
        if chunk is None:
            break
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            chunks.append(network.encode(chunk.to(device, non_blocking=True)).float())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compute_s += time.perf_counter() - start
    if not chunks:
        chunks.append(torch.zeros(1, network.feature_dim, device=device))
    features = torch.cat(chunks)
    if aggregation == "max":
        probs = aggregate(torch.softmax(network.tile_head(features).float(), dim=1).cpu().numpy(), "max")
    else:
        probs = torch.softmax(network.pool(features)[0].float(), dim=1)[0].cpu().numpy()
    return {"probs": probs, "tiles": len(boxes), "read_s": read_s, "compute_s": compute_s}


class LoadTileBagd(MapTransform, Randomizable):
    """Replace a slide path by a random bag of its tissue tiles, ``(n, 3, s, s)`` uint8, and add the bag's
    tile labels, ``tile_label`` ``(n,)``.

    The bag of one training step, as MONAI's MIL tutorial draws it (its ``tile_count``). A tile's label is the
    class its slide's annotation gives it, as SMT labels a region (:func:`~smt_monai.focus.selection.
    region_class`: the highest class it overlaps by ``tumour_overlap``, never above the slide's label); every
    tile of a negative slide is 0, and a tile of a positive slide without annotation is unknown (-1). With
    ``guide``, the bag of an annotated positive slide holds, with that probability, a quarter of its tiles (at
    least one) from the tiles of the slide's own class: its tumour, or for grading its worst grade, the tiles
    that make its label (SMT's ``guide``; 0, the default, is the standard pipeline: a tumour fraction of a few
    percent leaves many random bags of a positive slide without tumour). A slide's tissue tiles and their
    labels are found once and kept.

    Args:
        keys: the key holding the slide path.
        tile_size: tile side in pixels (SMT's ``patch_size``).
        tile_mpp: um/px the tiles are read at; None: the slide's level 0.
        default_mpp: the scanner's level-0 um/px for slides whose file holds none (with ``tile_mpp``).
        bag_size: tiles per bag.
        guide: probability of a guided bag (annotated positive slides only).
        tumour_overlap: overlap fraction that gives a tile a class (SMT's layer-3 ``label_overlap``).
        class_names: the slide classes (the datalist's "labels"), whose names the annotation classes carry
            (:func:`~smt_monai.data.annotations.annotation_classes`); None: tumour / not tumour.
        backend: slide backend.
        num_workers: reading threads.
        seed: seed of the bag draws.

    Raises:
        ValueError: ``guide`` is not a probability.
    """

    def __init__(
        self,
        keys: Sequence[Hashable] = ("image",),
        tile_size: int = 256,
        bag_size: int = 64,
        guide: float = 0.0,
        tumour_overlap: float = 0.1,
        backend: str = "auto",
        num_workers: int = 2,
        seed: int | None = None,
        tile_mpp: float | None = None,
        default_mpp: float | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if not 0.0 <= guide <= 1.0:
            raise ValueError(f"guide must be in [0, 1], got {guide}")
        super().__init__(keys)
        self.set_random_state(seed)
        self.tile_size = tile_size
        self.bag_size = bag_size
        self.guide = guide
        self.tumour_overlap = tumour_overlap
        self.num_workers = num_workers
        self.tile_mpp = tile_mpp
        self.default_mpp = default_mpp
        self.annotation_names = annotation_classes(class_names) if class_names else TUMOUR_NAMES
        self.cache = SlideCache(backend, capacity=4)
        self._tiles: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}

    def tiles(self, path: str) -> np.ndarray:
        """The slide's tissue tiles (at least one tile, the top-left one, on a slide without tissue)."""
        if path not in self._tiles:
            slide = self.cache.get(path)
            boxes, side = slide_tiles(slide, self.tile_size, self.tile_mpp, self.default_mpp)
            self._tiles[path] = boxes if len(boxes) else np.array([[0.0, 0.0, side]])
        return self._tiles[path]

    def tile_labels(self, entry: Mapping[Hashable, Any], path: str) -> np.ndarray:
        """The class of each of the slide's tiles: 0 on a negative slide, -1 (unknown) on a positive one
        without annotation, else the class its annotation gives it, at most the slide's label."""
        if path not in self._labels:
            label = int(entry.get("label", 0))
            count = len(self.tiles(path))
            if label == 0:
                labels = np.zeros(count, dtype=np.int64)
            elif not entry.get("annotation"):
                labels = np.full(count, -1, dtype=np.int64)
            else:
                annotation = TumourAnnotation.from_file(str(entry["annotation"]), self.annotation_names)
                overlap = annotation.class_overlap(self.tiles(path), label, samples=8)
                labels = region_class(torch.from_numpy(overlap), self.tumour_overlap).numpy()
            self._labels[path] = labels
        return self._labels[path]

    def tumour_tiles(self, entry: Mapping[Hashable, Any], path: str) -> np.ndarray:
        """Indices of the tiles of an annotated positive slide whose class is the slide's own."""
        label = int(entry.get("label", 0))
        return np.flatnonzero(self.tile_labels(entry, path) == label) if label > 0 else np.zeros(0, np.int64)

    def pick(self, entry: Mapping[Hashable, Any], path: str) -> np.ndarray:
        """Tile indices of one bag: random, or with ``guide`` a quarter of them of the slide's class."""
        count = len(self.tiles(path))
        size = min(self.bag_size, count)
        tumour = self.tumour_tiles(entry, path) if self.guide > 0 else np.zeros(0, dtype=np.int64)
        if len(tumour) == 0 or self.R.random() >= self.guide:
            return self.R.choice(count, size, replace=False)
        guided = self.R.choice(tumour, min(len(tumour), max(1, size // 4)), replace=False)
        rest = np.setdiff1d(np.arange(count), guided)
        return np.concatenate([guided, self.R.choice(rest, size - len(guided), replace=False)])

    def randomize(self, data: Any = None) -> None:  # the draws happen in ``pick``, per key
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            picked = np.sort(self.pick(d, path))
            slide = self.cache.get(path)
            boxes = self.tiles(path)[picked]
            images = np.concatenate(
                [im for _, im in iter_boxes(slide, boxes, self.tile_size, self.num_workers, 64)]
            )
            d[key] = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
            d["tile_label"] = torch.from_numpy(self.tile_labels(d, path)[picked])
        return d


class DenseEvaluator(SlideEvaluator):
    """Predicts every slide with :func:`predict_dense` (all tissue tiles), reported through SMT's slide
    metrics and ``metrics.json`` (one "layer"; no focus outcomes).

    Args:
        device: where the network runs.
        val_data_loader: loader of ``{"image": path, "label": int}`` entries.
        network: the :class:`DenseMIL`.
        tile_size: tile side in pixels.
        backend: slide backend.
        num_workers: reading threads.
        tile_mpp, default_mpp: as :class:`LoadTileBagd`.
        aggregation: ``attention`` or ``max`` (:func:`predict_dense`).
        key_val_metric, additional_metrics, val_handlers, amp, class_names: as ``SlideEvaluator``.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: DataLoader,
        network: DenseMIL,
        tile_size: int = 256,
        backend: str = "auto",
        num_workers: int = 2,
        key_val_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        tile_mpp: float | None = None,
        default_mpp: float | None = None,
        aggregation: str = "attention",
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            device, val_data_loader, key_val_metric, additional_metrics, val_handlers, amp, class_names
        )
        self.aggregation = check_dense_aggregation(aggregation)
        self.network = network
        self.tile_size = tile_size
        self.tile_mpp = tile_mpp
        self.default_mpp = default_mpp
        self.num_workers = num_workers
        self.cache = SlideCache(backend, capacity=2)

    def evaluate_slide(self, item: Mapping[str, Any]) -> SlideOutcome | None:
        self.network.eval()
        try:
            slide = self.cache.get(str(item["image"]))
            result = predict_dense(
                self.network, slide, self.tile_size, num_workers=self.num_workers, device=self.state.device,
                amp=self.amp, tile_mpp=self.tile_mpp, default_mpp=self.default_mpp,
                aggregation=self.aggregation,
            )  # fmt: skip
        except SlideReadError as exc:
            logger.warning("evaluation: skipping slide %s", exc)
            return None
        return SlideOutcome(result["probs"][None], mpp=known_mpp(slide, self.default_mpp))
