"""The SMT trainer: MONAI's ``Trainer`` whose iteration runs the three-layer cascade (Sec. 3.2-3.3, Eq. 7).

One iteration: the cascade's training walk (:class:`smt_monai.cascade.CascadeTraining`: layer 1 on the
batch's cached layer-1 views, top-K by ``q`` plus the weak-supervision extra benign region, reads of the
focused regions at the next magnification, layer 2, top-K, reads, layer 3, the score-bank update of Eq. 2 and
the losses of Eq. 7), one backward and one optimiser step. This module adds the schedule state that the
handlers set (``num_layers``, ``lambda_fwd``, ``lambda_bwd``), robustness to broken slides, and gradient
averaging across processes under ``torchrun``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from monai.engines import Trainer
from torch.utils.data import DataLoader

from smt_monai.cascade.training import CascadeStep, CascadeTraining
from smt_monai.data.annotations import AnnotationOverlap, annotation_classes
from smt_monai.data.datalist import numbered_class_names
from smt_monai.data.errors import SlideReadError
from smt_monai.data.regions import RegionReader

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the message names the iteration and the slides of the batch."""


def smt_param_groups(network: torch.nn.Module, lrs: Sequence[float] = (0.002, 0.002, 0.01)) -> list[dict]:
    """Optimiser parameter groups with the paper's per-layer learning rates (layers 1-2: 0.002, 3: 0.01);
    the slide and risk heads, where the network has them, learn with layer 3 (they pool its embeddings)."""
    if len(lrs) != 3:
        raise ValueError(f"lrs needs one learning rate per layer (3), got {len(lrs)}")
    layers = (network.layer1, network.layer2, network.layer3)
    groups = [{"params": list(layer.parameters()), "lr": float(lr)} for layer, lr in zip(layers, lrs)]
    for head in ("slide_head", "risk_head"):
        if getattr(network, head, None) is not None:
            groups[2]["params"] += list(getattr(network, head).parameters())
    return groups


def average_gradients(network: torch.nn.Module) -> None:
    """Average gradients over all processes (``torchrun``); missing gradients count as zeros.

    The cascade calls the three layers separately and a layer may be inactive, which DDP's wrapper does
    not support; an explicit all-reduce of every parameter, in a fixed order, does the same job.
    """
    world = dist.get_world_size()
    for param in network.parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad /= world


class SMTTrainer(Trainer):
    """Ignite engine (via MONAI's ``Trainer``) that trains SMT on batches of slides.

    Args:
        device: where the network runs.
        max_epochs: epochs to train.
        train_data_loader: loader of layer-1 views (``layer1_dataset``, batched by ``collate_views``).
        network: an ``SMT`` module.
        optimizer: optimiser over ``smt_param_groups(network)``.
        cascade: the training walk and its Eq. 7 losses (focusing, selection and loss settings).
        reader: reader of the focused regions.
        epoch_length: iterations per epoch (default: the loader's length).
        train_handlers: handlers to attach (MONAI's ``handlers`` argument).
        amp: bfloat16 autocast (``smt_monai.utils.fast_bf16`` says where it pays).
        class_names: the model's class names: which annotation classes label regions
            (:func:`~smt_monai.data.annotations.annotation_classes`; default: tumour, for two classes).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        cascade: CascadeTraining,
        reader: RegionReader,
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            device=torch.device(device),
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            handlers=train_handlers,
            amp=amp,
            decollate=False,
        )
        self.network = network
        self.optimizer = optimizer
        self.cascade = cascade
        self.reader = reader
        classes = class_names or numbered_class_names(network.config.num_classes)
        self.overlap = AnnotationOverlap(annotation_classes(classes))
        self.state.num_layers = 3
        self.state.lambda_fwd = [1.0, 1.0, 1.0]
        self.state.lambda_bwd = [0.1, 0.1]
        self.state.skipped_slides = []

    def _iteration(self, engine: SMTTrainer, batchdata: dict[str, Any]) -> dict[str, float]:
        keep = [i for i, error in enumerate(batchdata["error"]) if not error]
        for i in set(range(len(batchdata["error"]))) - set(keep):
            self._skip(batchdata["path"][i], batchdata["error"][i])
        self.network.train()
        while keep:
            try:
                step = self._forward(batchdata, keep)
            except SlideReadError as exc:
                failed = [i for i in keep if batchdata["path"][i] == exc.path]
                if not failed:
                    raise
                self._skip(exc.path, str(exc))
                keep = [i for i in keep if i not in failed]
                continue
            return self._backward(step, [batchdata["path"][i] for i in keep])
        return {"skipped_batch": 1.0}

    def _skip(self, path: str, reason: str) -> None:
        logger.warning("epoch %d: skipping slide %s: %s", self.state.epoch, path, reason)
        self.state.skipped_slides.append((self.state.epoch, path))

    def _forward(self, batchdata: dict[str, Any], keep: list[int]) -> CascadeStep:
        paths = [batchdata["path"][i] for i in keep]
        annotations = [batchdata["annotation"][i] for i in keep]
        field_slide = torch.as_tensor(batchdata["field_slide"])
        fields = torch.isin(field_slide, torch.as_tensor(keep)).nonzero().squeeze(1)
        renumbered = torch.searchsorted(torch.as_tensor(keep), field_slide[fields]).numpy()
        survival = None
        if "time" in batchdata:  # collate_views gives both keys, NaN for slides without survival
            times, events = (torch.as_tensor(batchdata[k], dtype=torch.float32) for k in ("time", "event"))
            survival = torch.stack([times, events], dim=1)[torch.as_tensor(keep)]
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.state.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.cascade(
                self.network,
                batchdata["image"][fields].to(self.state.device),
                batchdata["box"][fields],
                torch.as_tensor(batchdata["label"])[torch.as_tensor(keep)],
                [batchdata["slide_id"][i] for i in keep],
                lambda index, boxes: self.reader.chunks(paths, index, boxes),
                lambda index, boxes: self.overlap(annotations, index, boxes),
                self.state.num_layers,
                self.state.lambda_fwd,
                self.state.lambda_bwd,
                renumbered,
                survival,
            )

    def _backward(self, step: CascadeStep, paths: list[str]) -> dict[str, float]:
        total = step.losses["total"]
        if not math.isfinite(total.item()):
            raise TrainingDivergedError(
                f"loss is {total.item()} at epoch {self.state.epoch}, iteration {self.state.iteration}; "
                f"slides: {', '.join(paths)}"
            )
        total.backward()
        if dist.is_available() and dist.is_initialized():
            average_gradients(self.network)
        self.optimizer.step()
        output = {name: float(value.detach()) for name, value in step.losses.items()}
        output["loss"] = output["total"]
        for layer, (done, labels) in enumerate(zip(step.passes, step.labels), start=1):
            predicted = done.run.out.probs.argmax(dim=1).cpu()
            output[f"accuracy{layer}"] = float((predicted == labels).float().mean())
            output[f"positive{layer}"] = float((labels > 0).float().mean())
        for layer, value in enumerate(self.state.lambda_fwd, start=1):
            output[f"lambda_fwd{layer}"] = float(value)
        for layer, value in enumerate(self.state.lambda_bwd, start=1):
            output[f"lambda_bwd{layer}"] = float(value)
        output["active_layers"] = float(self.state.num_layers)
        return output
