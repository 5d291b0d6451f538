"""The Python API of a trained SMT: slides in, :class:`~smt_monai.cascade.SlidePrediction` objects out.

    predictor = SMTPredictor.from_checkpoint("model.pt")
    result = predictor.predict("slide.svs")   # result.probs, result.label, result.regions(), ...
    for result in predictor.predict_many(paths): ...

A predictor owns the slide reading (an open-slide cache shared by the layer-1 loader and the region reader)
and runs :func:`smt_monai.cascade.predict_slide` on each slide; ``predict_many`` reads the next slide's
layer-1 view in a background thread while the current one computes, and returns an unreadable slide as a
result whose ``error`` says why instead of stopping.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from smt_monai.cascade.prediction import SlidePrediction, check_aggregation, check_num_focus, predict_slide
from smt_monai.data.datalist import numbered_class_names
from smt_monai.data.dataset import LoadLayer1d
from smt_monai.data.errors import SlideReadError
from smt_monai.data.magnification import LayerScale, check_default_mpp
from smt_monai.data.regions import RegionReader, SlideCache
from smt_monai.inference.model import ModelCard, load_model
from smt_monai.utils import fast_bf16, usable_device


class SMTPredictor:
    """A trained SMT network with everything needed to predict slides.

    Settings left ``None`` come from the model card the network carries (``load_model``), or the defaults
    (K = 4, ``max``, 0.5, ``class_0 ..``) for a network without one.

    Args:
        network: an ``SMT`` module or its TorchScript export (its ``read_size``, ``grid``, ``geometry`` and
            ``layer3_mpp`` say how regions are read).
        num_focus: ``K``.
        aggregation: ``max`` or ``mean`` over the layer-3 regions, or ``learned`` (the model's slide head).
        threshold: decision threshold on P(positive) of a binary model.
        backend: slide backend (``auto``, ``cucim``, ``openslide``, ``tifffile``).
        num_workers: region-reading threads.
        device: where the network runs.
        amp: bfloat16 autocast (default: where it is fast, ``fast_bf16``).
        focus_source: ``q`` (SMT) or, for the ablations, ``score`` / ``attention``.
        reader: a region reader to share (its open-slide cache serves the layer-1 views too); default: one
            of its own, ``backend`` and ``num_workers`` apply to it.
        default_mpp: the scanner's level-0 um/px for slides whose file holds none.
        open_slides: slides its own reader keeps open; at least the slides predicted at once, so that no
            thread closes a slide another is still reading.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        num_focus: int | None = None,
        aggregation: str | None = None,
        backend: str = "auto",
        num_workers: int = 2,
        device: torch.device | str = "cpu",
        amp: bool | None = None,
        focus_source: str = "q",
        reader: RegionReader | None = None,
        default_mpp: float | None = None,
        threshold: float | None = None,
        open_slides: int = 4,
    ) -> None:
        self.device = usable_device(device)
        self.network = network.to(self.device)
        card = ModelCard.of(network) if getattr(network, "card", "") else None
        classes = int(network.layer3.head.out_features) if hasattr(network.layer3, "head") else 2
        self.num_focus = check_num_focus(
            network, num_focus if num_focus is not None else card.num_focus if card else 4
        )
        check_default_mpp(default_mpp)
        self.aggregation = check_aggregation(network, aggregation or (card.aggregation if card else "max"))
        self.threshold = float(threshold if threshold is not None else card.threshold if card else 0.5)
        self.class_names = card.class_names if card else numbered_class_names(classes)
        self.focus_source = focus_source
        self.amp = fast_bf16(self.device) if amp is None else amp
        read_size = int(network.read_size)
        # Chunks of K regions: layer 3 reads its K^2 regions in K chunks, one read ahead of the network.
        chunks = self.num_focus
        self.reader = reader or RegionReader(
            read_size, backend, num_workers, chunks, SlideCache(backend, open_slides)
        )
        self.load_view = LoadLayer1d(
            LayerScale.of(network), backend, cache=self.reader.cache, default_mpp=default_mpp
        )

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: torch.device | str = "cpu", **options: Any
    ) -> SMTPredictor:
        """A predictor of the model file at ``path`` (``model.pt`` or ``model.ts``), with its own settings
        unless ``options`` (any argument of the constructor) say otherwise.

        Raises:
            ModelFileError: the file is missing or not a self-describing smt-monai model.
        """
        return cls(load_model(path, device), device=device, **options)

    def view(self, path: str | os.PathLike) -> dict[str, Any]:
        """The slide's layer-1 view (``LoadLayer1d``), with ``load_s``, the seconds it took to read."""
        start = time.perf_counter()
        view = self.load_view({"image": os.fspath(path)})
        view["load_s"] = time.perf_counter() - start
        return view

    def predict_view(self, view: dict[str, Any]) -> SlidePrediction:
        """Predict a slide from its layer-1 view; an unreadable slide gives a result with ``error`` set."""
        if view["error"]:
            return SlidePrediction(path=view["path"], error=view["error"])
        self.network.eval()
        try:
            result = predict_slide(
                self.network,
                view,
                self.reader,
                self.num_focus,
                self.aggregation,
                self.focus_source,
                device=self.device,
                amp=self.amp,
                threshold=self.threshold,
            )
        except SlideReadError as exc:
            return SlidePrediction(path=view["path"], error=str(exc))
        result.class_names = list(self.class_names)
        load_s = float(view.get("load_s", 0.0))
        result.read_s += load_s
        result.seconds += load_s
        return result

    def predict(self, path: str | os.PathLike) -> SlidePrediction:
        """Predict one slide.

        Raises:
            SlideReadError: the slide cannot be read (the message names the file and the problem).
        """
        result = self.predict_view(self.view(path))
        if result.error:
            raise SlideReadError(result.path, result.error.removeprefix(f"{result.path}: "))
        return result

    def predict_many(self, paths: Iterable[str | os.PathLike]) -> Iterator[SlidePrediction]:
        """Predict slides in order, yielding each result as it is done (errors as results with a reason).

        The next slide's layer-1 view is read in a background thread while the current slide computes.
        """
        queue = list(paths)
        with ThreadPoolExecutor(1) as loader:
            pending: Future | None = loader.submit(self.view, queue[0]) if queue else None
            for index in range(len(queue)):
                assert pending is not None
                view = pending.result()
                pending = loader.submit(self.view, queue[index + 1]) if index + 1 < len(queue) else None
                yield self.predict_view(view)

    def close(self) -> None:
        """Close the open slides."""
        self.reader.close()
