"""The dense baseline SMT is compared against: tile all tissue at level 0, encode every tile, attention-MIL.

This is the pipeline most slide classifiers run today (CLAM, MONAI's MIL tutorial, TransMIL): cut the tissue
into ``tile_size`` tiles at level 0, encode each tile with a CNN, pool the tile features with attention
(Ilse et al., 2018) into one slide embedding, classify it. The encoder is MONAI's ResNet-18 with the
standard stride-2 stem (``conv1_t_stride=2``; MONAI's default stride 1 costs four times as much per tile),
initialised at random since nothing can be downloaded. Tiles are read through the project's own reader
(:func:`smt_monai.data.iter_boxes`), so both methods pay the same I/O.

Training follows MONAI's MIL tutorial: each step encodes a random bag of ``bag_size`` tissue tiles of a
slide end to end; prediction encodes all of them, ``chunk_size`` at a time (reading the next chunk while
the current one is encoded), and pools once over all features. With ``guide`` > 0, bags of annotated
positive slides are given tumour tiles, the dense counterpart of SMT's annotation-guided focus, so that the
two methods can be compared with the same supervision.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import resnet18
from PIL import Image
from tqdm import tqdm

from smt_monai.data.annotations import TumourAnnotation
from smt_monai.data.regions import SlideCache, iter_boxes
from smt_monai.data.slide import Slide
from smt_monai.data.tissue import tissue_mask
from smt_monai.handlers.metrics import balanced_accuracy, roc_auc
from smt_monai.inference.model import load_network
from smt_monai.networks.normalization import normalize_he
from smt_monai.utils import atomic_path, prefetch

logger = logging.getLogger(__name__)


class DenseMIL(nn.Module):
    """ResNet-18 tile encoder and gated-attention MIL pooling (Ilse et al., 2018, Eq. 9).

    Equivalent to ``monai.networks.nets.MILModel(mil_mode="att")`` with this backbone, but split into
    :meth:`encode` and :meth:`pool` so that a slide's tens of thousands of tiles can be encoded in chunks and
    pooled once, which ``MILModel.forward`` (all tiles in one ``(B, N, C, H, W)`` tensor) cannot do.

    Args:
        num_classes: slide classes (class 0 negative).
        attention_dim: hidden width of the attention network.
    """

    feature_dim = 512

    def __init__(self, num_classes: int = 2, attention_dim: int = 128) -> None:
        super().__init__()
        self.encoder = resnet18(spatial_dims=2, n_input_channels=3, conv1_t_stride=2, feed_forward=False)
        self.attention_v = nn.Linear(self.feature_dim, attention_dim)
        self.attention_u = nn.Linear(self.feature_dim, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(n, 512)`` features of normalised tiles ``(n, 3, s, s)``."""
        return self.encoder(tiles.contiguous(memory_format=torch.channels_last))

    def pool(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slide logits ``(1, C)`` and tile attention ``(n,)`` from the features of all its tiles."""
        gate = torch.tanh(self.attention_v(features)) * torch.sigmoid(self.attention_u(features))
        attention = torch.softmax(self.attention_w(gate).squeeze(-1), dim=0)
        embedding = (attention[:, None] * features).sum(dim=0, keepdim=True)
        return self.classifier(embedding), attention

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """Logits ``(1, C)`` of one bag of normalised tiles ``(n, 3, s, s)``."""
        return self.pool(self.encode(tiles))[0]


def tile_tissue(slide: Slide, tile_size: int, min_tissue: float = 0.25) -> np.ndarray:
    """Level-0 boxes ``(N, 3)`` of the grid tiles of ``tile_size`` px with tissue fraction >= ``min_tissue``.

    The tissue mask is the one that gives SMT its layer-1 box (Otsu on saturation of the smallest level),
    area-averaged onto the tile grid.
    """
    image = slide.smallest_level_image
    if image is None:
        image = slide.read_level(slide.level_count - 1)
    mask = tissue_mask(image).astype(np.float32)
    width, height = slide.dimensions
    cols, rows = width // tile_size, height // tile_size
    if cols == 0 or rows == 0:
        return np.zeros((0, 3))
    # the mask covers the whole slide; crop it to the part the full tiles cover, then average per tile
    crop_w = max(1, round(mask.shape[1] * cols * tile_size / width))
    crop_h = max(1, round(mask.shape[0] * rows * tile_size / height))
    cropped = Image.fromarray(mask[:crop_h, :crop_w])
    fraction = np.asarray(cropped.resize((cols, rows), Image.Resampling.BOX))
    ys, xs = np.nonzero(fraction >= min_tissue)
    return np.stack([xs * tile_size, ys * tile_size, np.full(len(xs), tile_size)], axis=1).astype(np.float64)


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
) -> dict[str, Any]:
    """Encode every tile of ``boxes`` (default: all tissue tiles) and pool them into a slide prediction.

    Returns:
        ``probs`` (C,) numpy, ``tiles`` encoded, ``read_s`` (waiting for tiles) and ``compute_s`` seconds.
    """
    device = torch.device(device)
    boxes = tile_tissue(slide, tile_size) if boxes is None else boxes
    features = []
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
            features.append(network.encode(normalize_he(chunk.to(device, non_blocking=True))).float())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compute_s += time.perf_counter() - start
    if not features:
        features.append(torch.zeros(1, network.feature_dim, device=device))
    logits, _ = network.pool(torch.cat(features))
    probs = torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
    return {"probs": probs, "tiles": len(boxes), "read_s": read_s, "compute_s": compute_s}


class DenseTrainer:
    """Train :class:`DenseMIL` on a datalist: one random bag of tissue tiles per slide and step.

    Args:
        network: the model.
        entries: training entries ``{"image", "label"}`` (``smt_monai.data.load_datalist``).
        output_dir: ``model.pt`` (state dict) and ``train_log.json`` go here.
        tile_size: tile side in level-0 pixels (SMT's ``patch_size``).
        max_epochs: passes over the slides.
        bag_size: tiles per slide and step (MONAI's MIL tutorial: ``tile_count``).
        learning_rate: Adam's learning rate.
        backend: slide backend.
        num_workers: reading threads.
        device: where the network trains.
        amp: bfloat16 autocast (see ``smt_monai.utils.fast_bf16`` for where it pays).
        guide: probability that the bag of an annotated positive slide holds a quarter of its tiles (at
            least one) from the tiles whose tumour overlap reaches ``tumour_overlap`` (SMT's ``guide``; 0,
            the default, is the standard pipeline: a tumour fraction of a few percent leaves many random
            bags of a positive slide without tumour).
        tumour_overlap: tumour-overlap fraction of a tumour tile (SMT's layer-3 ``label_overlap``).
        seed: bag sampling and slide order.
    """

    def __init__(
        self,
        network: DenseMIL,
        entries: Sequence[Mapping[str, Any]],
        output_dir: str | os.PathLike,
        tile_size: int = 256,
        max_epochs: int = 20,
        bag_size: int = 64,
        learning_rate: float = 1e-4,
        backend: str = "auto",
        num_workers: int = 2,
        device: torch.device | str = "cpu",
        amp: bool = False,
        guide: float = 0.0,
        tumour_overlap: float = 0.1,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= guide <= 1.0:
            raise ValueError(f"guide must be in [0, 1], got {guide}")
        self.network = network
        self.entries = list(entries)
        self.output_dir = Path(output_dir)
        self.tile_size = tile_size
        self.max_epochs = max_epochs
        self.bag_size = bag_size
        self.device = torch.device(device)
        self.amp = amp
        self.guide = guide
        self.tumour_overlap = tumour_overlap
        self.num_workers = num_workers
        self.rng = np.random.default_rng(seed)
        self.cache = SlideCache(backend, capacity=4)
        self.optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate, weight_decay=1e-4)
        self._tiles: dict[str, np.ndarray] = {}
        self._tumour: dict[str, np.ndarray] = {}

    def _tumour_tiles(self, entry: Mapping[str, Any], boxes: np.ndarray) -> np.ndarray:
        """Indices of the tiles of an annotated positive slide whose tumour overlap reaches the threshold."""
        path = str(entry["image"])
        if path not in self._tumour:
            found = np.zeros(0, dtype=np.int64)
            if int(entry["label"]) > 0 and entry.get("annotation"):
                overlap = TumourAnnotation.from_file(entry["annotation"]).overlap_fraction(boxes, samples=8)
                found = np.flatnonzero(overlap >= self.tumour_overlap)
            self._tumour[path] = found
        return self._tumour[path]

    def _pick(self, entry: Mapping[str, Any], boxes: np.ndarray) -> np.ndarray:
        """Tile indices of one bag: random, or with ``guide`` a quarter of them tumour tiles."""
        size = min(self.bag_size, len(boxes))
        tumour = self._tumour_tiles(entry, boxes) if self.guide > 0 else np.zeros(0, dtype=np.int64)
        if len(tumour) == 0 or self.rng.random() >= self.guide:
            return self.rng.choice(len(boxes), size, replace=False)
        guided = self.rng.choice(tumour, min(len(tumour), max(1, size // 4)), replace=False)
        rest = np.setdiff1d(np.arange(len(boxes)), guided)
        return np.concatenate([guided, self.rng.choice(rest, size - len(guided), replace=False)])

    def _bag(self, entry: Mapping[str, Any]) -> torch.Tensor:
        path = str(entry["image"])
        slide = self.cache.get(path)
        if path not in self._tiles:
            self._tiles[path] = tile_tissue(slide, self.tile_size)
        boxes = self._tiles[path]
        if len(boxes) == 0:
            boxes = np.array([[0.0, 0.0, float(self.tile_size)]])
        pick = self._pick(entry, boxes)
        images = np.concatenate(
            [im for _, im in iter_boxes(slide, boxes[np.sort(pick)], self.tile_size, self.num_workers, 64)]
        )
        return normalize_he(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))

    def run(self) -> dict[str, Any]:
        """Train for ``max_epochs``; writes ``model.pt`` and ``train_log.json`` and returns the log."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.network.to(self.device).train()
        log: dict[str, Any] = {"epochs": []}
        start = time.perf_counter()
        for epoch in range(1, self.max_epochs + 1):
            losses = []
            for i in self.rng.permutation(len(self.entries)):
                entry = self.entries[i]
                bag = self._bag(entry).to(self.device)
                label = torch.tensor([int(entry["label"])], device=self.device)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    logits = self.network(bag)
                loss = F.cross_entropy(logits.float(), label)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                losses.append(loss.item())
            log["epochs"].append({"epoch": epoch, "loss": round(float(np.mean(losses)), 5)})
            logger.info("dense epoch %d/%d loss %.4f", epoch, self.max_epochs, np.mean(losses))
        log["seconds"] = round(time.perf_counter() - start, 2)
        with atomic_path(self.output_dir / "model.pt") as tmp:
            torch.save(self.network.state_dict(), tmp)
        (self.output_dir / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
        self.cache.close()
        return log


class DenseEvaluator:
    """Predict every slide of a datalist split with :class:`DenseMIL` and write ``metrics.json``.

    The metrics are those ``evaluate.yaml`` writes for SMT (``balanced_accuracy``, ``auc``, ``num_slides``,
    ``seconds_per_slide``), so the two can be put side by side.

    Args:
        network: the trained model.
        entries: ``{"image", "label"}`` entries.
        output_path: the ``metrics.json`` to write.
        tile_size: tile side in level-0 pixels.
        ckpt_path: a ``model.pt`` to load first (``None``: use ``network`` as it is).
        backend, num_workers, device: as :func:`predict_dense`.
        amp: bfloat16 autocast (see ``smt_monai.utils.fast_bf16`` for where it pays).
        progress: show a progress bar over the slides (each takes seconds to minutes).
    """

    def __init__(
        self,
        network: DenseMIL,
        entries: Sequence[Mapping[str, Any]],
        output_path: str | os.PathLike,
        tile_size: int = 256,
        ckpt_path: str | os.PathLike | None = None,
        backend: str = "auto",
        num_workers: int = 2,
        device: torch.device | str = "cpu",
        amp: bool = False,
        progress: bool = True,
    ) -> None:
        self.network = network
        self.entries = list(entries)
        self.output_path = Path(output_path)
        self.progress = progress
        self.tile_size = tile_size
        self.ckpt_path = ckpt_path
        self.backend = backend
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.amp = amp

    def run(self) -> dict[str, Any]:
        """Predict all slides; returns the metrics (also written to ``output_path``)."""
        if self.ckpt_path is not None:
            load_network(self.network, self.ckpt_path, "checkpoint", self.device)
        self.network.to(self.device).eval()
        labels, probs, seconds = [], [], []
        cache = SlideCache(self.backend, capacity=2)
        for entry in tqdm(self.entries, desc="dense evaluation", unit="slide", disable=not self.progress):
            start = time.perf_counter()
            result = predict_dense(
                self.network,
                cache.get(str(entry["image"])),
                self.tile_size,
                num_workers=self.num_workers,
                device=self.device,
                amp=self.amp,
            )
            seconds.append(time.perf_counter() - start)
            labels.append(int(entry["label"]))
            probs.append(result["probs"])
        cache.close()
        labels_a, probs_a = np.array(labels), np.stack(probs)
        auc = roc_auc(labels_a, probs_a)
        metrics = {
            "balanced_accuracy": round(balanced_accuracy(labels_a, probs_a.argmax(axis=1)), 6),
            "auc": None if math.isnan(auc) else round(auc, 6),
            "num_slides": len(labels),
            "seconds_per_slide": round(float(np.mean(seconds)), 6),
        }
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.output_path) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics
