"""Pretrained ViT-S/16 weights for the transformers of SMT layers.

The paper starts its encoders from ImageNet weights ("The encoders use parameters pretrained on ImageNet",
Sec. 4.1). With the ``paper`` preset the transformer of an SMT layer has the shape of a ViT-S/16 (width 384,
depth 12, 6 heads, class token, pre-norm blocks, final LayerNorm), so a published ViT-S/16 checkpoint can
initialise it: ImageNet models from timm or DeiT, and self-supervised pathology models published in the
layout of DINO's ``vision_transformer.py`` (whose parameter names equal timm's).

What is copied, per chosen layer (``SMTLayer`` names on the left, checkpoint names on the right):

- ``cls_token`` <- ``cls_token``;
- ``pos_embed`` <- ``pos_embed``: the class token's position kept, the patch positions resampled from the
  checkpoint's grid (14 x 14 for 224 px inputs) to the layer's ``grid`` x ``grid`` by bicubic interpolation
  with antialiasing, as timm's ``resample_abs_pos_embed`` does (both grids row-major, as the patch stem's
  tokens are); a checkpoint without a class position (timm's ``no_embed_class``) gives the class token
  position zero, which is what such a model adds to it;
- ``first_block`` <- ``blocks.0`` and ``blocks.{i-1}`` <- ``blocks.{i}``: ``norm1``, ``attn.qkv``,
  ``attn.out_proj`` <- ``attn.proj``, ``norm2``, ``mlp.linear1`` <- ``mlp.fc1``, ``mlp.linear2`` <-
  ``mlp.fc2`` (the query/key/value rows are laid out as timm's, ``(3, heads, head_dim)``, in both
  ``AttentionWithWeights`` and MONAI's ``SABlock``, so the fused projection copies as is);
- ``norm`` <- ``norm``.

What stays as initialised: the classification head (a checkpoint's head classifies ImageNet, or is a DINO
projection head), the focusing predictor (SMT's own), and the patch stem. The stem is trained from scratch
rather than initialised from the checkpoint's 16 x 16 patch embedding, because that projection cannot carry
over: it is one linear map of a 16 px RGB patch of an ImageNet photograph, normalised by ImageNet's channel
means, while the stem reads a 256 px patch in optical density (``normalize_he``), pools it and runs two
GELU convolutions before its projection, so no copy or resampling of the 16 x 16 kernel computes the same
function, or even sees the same kind of input. The blocks are pre-norm, so they normalise whatever scale
the stem's tokens have before attending: the pretrained attention and MLP weights work on the stem's
tokens from the first step, and the stem learns to produce tokens they can use.

Two differences from the source model remain by design: SMT's LayerNorms use PyTorch's ``eps = 1e-5`` where
timm and DINO use ``1e-6`` (block outputs agree to about 1e-5), and MONAI's ``MLPBlock`` uses the exact GELU
as timm does.

Files: ``.safetensors`` (read with the ``safetensors`` package) or anything ``torch.load`` reads
(``.pth``, ``.pt``, ``.bin``, ``.torch``), loaded with ``weights_only=True``. A state dict may be wrapped
as DeiT (``{"model": ...}``), as a training checkpoint (``"state_dict"``) or as DINO's full checkpoint
(``"teacher"`` preferred over ``"student"``, with ``module.`` and ``backbone.`` prefixes, and the run's
``argparse.Namespace`` under ``"args"``, which is allowed through the weights-only unpickler).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from smt_monai.data.errors import UserError
from smt_monai.networks.layer import SMTLayer
from smt_monai.utils import torch_load_problem

# Where a state dict sits inside a checkpoint, in order of preference (DINO's evaluation uses the teacher).
WRAPPER_KEYS = ("teacher", "model", "state_dict", "student")
# Prefixes a wrapper adds to every name: DistributedDataParallel's, and DINO's MultiCropWrapper's.
WRAPPER_PREFIXES = ("module.", "backbone.")
# Checkpoint tensors that have no counterpart in an SMT layer's transformer and are left out on purpose.
IGNORED_PREFIXES = ("patch_embed.", "head.", "mask_token")
# Sub-modules of a block: checkpoint (timm / DINO) name -> SMT layer name.
BLOCK_PARTS = {
    "norm1": "norm1",
    "attn.qkv": "attn.qkv",
    "attn.proj": "attn.out_proj",
    "norm2": "norm2",
    "mlp.fc1": "mlp.linear1",
    "mlp.fc2": "mlp.linear2",
}
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")
_SHOWN = 3  # names listed in an error message before "and N more"


class PretrainedWeightsError(UserError, ValueError):
    """A pretrained checkpoint cannot be read, or does not fit the SMT layer.

    The message is one line that names the file and the problem (the missing or mismatched tensors), so a
    training run stops with a reason instead of a long traceback.
    """

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")


def read_vit_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ViT state dict from ``path``, unwrapped and with wrapper prefixes removed.

    Args:
        path: a ``.safetensors`` file, or a file ``torch.load`` reads (loaded with ``weights_only=True``).

    Returns:
        Checkpoint name -> tensor, in timm / DINO naming (``blocks.0.attn.qkv.weight``, ...).

    Raises:
        PretrainedWeightsError: the file is missing, unreadable, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(path, "pretrained weights file does not exist")
    load_safetensors = _safetensors_loader(path) if path.suffix == ".safetensors" else None
    try:
        if load_safetensors is not None:
            content: object = load_safetensors(str(path), device="cpu")
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: one line, not the unpickler's traceback
        problem = _first_sentence(exc) if load_safetensors is not None else torch_load_problem(path, exc)
        raise PretrainedWeightsError(path, f"cannot read pretrained weights: {problem}") from None
    return _unwrap(content, path)


def _safetensors_loader(path: Path):
    """``safetensors.torch.load_file``, or a one-line error naming the optional package."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise PretrainedWeightsError(
            path, "reading .safetensors needs the safetensors package (pip install 'smt-monai[pretrained]')"
        ) from None
    return load_file


def _first_sentence(exc: Exception) -> str:
    """The first sentence of the safetensors reader's error (``Error while deserializing header``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0].split(". ", 1)[0] if lines else type(exc).__name__


def _unwrap(content: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the state dict in ``content``, descending through wrapper keys, prefixes removed."""
    while isinstance(content, Mapping) and not any(isinstance(v, torch.Tensor) for v in content.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(content.get(k), Mapping)), None)
        if key is None:
            raise PretrainedWeightsError(
                path, f"no state dict found (top-level keys: {', '.join(map(str, list(content)[:8]))})"
            )
        content = content[key]
    if not isinstance(content, Mapping):
        raise PretrainedWeightsError(path, f"holds a {type(content).__name__}, not a state dict")
    tensors = {}
    for name, value in content.items():
        if not isinstance(value, torch.Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix) :], True
        tensors[name] = value
    return tensors


def resample_position_embeddings(patch_pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Resample the patch position embeddings ``(1, g*g, D)`` of a ``g`` x ``g`` grid to ``grid`` x ``grid``.

    Bicubic interpolation with antialiasing in float32, as timm's ``resample_abs_pos_embed``; an equal grid
    is returned unchanged.

    Raises:
        ValueError: the embeddings do not form a square grid.
    """
    count, dim = patch_pos.shape[1], patch_pos.shape[2]
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"{count} patch position embeddings do not form a square grid")
    if side == grid:
        return patch_pos
    image = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(patch_pos.dtype)


def vit_to_layer_names(depth: int) -> dict[str, str]:
    """SMT layer parameter name -> checkpoint name for every transformer tensor of a ``depth``-block layer."""
    names = {name: name for name in ("cls_token", "pos_embed", "norm.weight", "norm.bias")}
    for block in range(depth):
        ours = "first_block" if block == 0 else f"blocks.{block - 1}"
        for theirs_part, ours_part in BLOCK_PARTS.items():
            for kind in ("weight", "bias"):
                names[f"{ours}.{ours_part}.{kind}"] = f"blocks.{block}.{theirs_part}.{kind}"
    return names


def vit_layer_state_dict(
    checkpoint: Mapping[str, torch.Tensor], layer: SMTLayer, source: str | os.PathLike = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The transformer tensors of ``layer`` taken from a ViT ``checkpoint`` (see the module docstring).

    Args:
        checkpoint: ViT state dict in timm / DINO naming, as ``read_vit_checkpoint`` returns it.
        layer: the SMT layer the tensors are for (its shapes and grid decide the checks and the resampling).
        source: the file the checkpoint came from, named in errors.

    Returns:
        ``SMTLayer`` parameter name -> tensor in the layer's dtype, for ``layer.load_state_dict(...,
        strict=False)``; the stem, head and focusing predictor are absent.

    Raises:
        PretrainedWeightsError: tensors are missing, the checkpoint has tensors the layer has no place for
            (more blocks, distillation or register tokens, LayerScale), or shapes differ (another width).
    """
    depth = 1 + len(layer.blocks)
    names = vit_to_layer_names(depth)
    own = layer.state_dict()
    needed = set(names.values())
    problems = []
    missing = sorted(needed - set(checkpoint), key=_natural)
    if missing:
        problems.append(f"missing {_listed(missing)}")
    unexpected = sorted(
        (k for k in checkpoint if k not in needed and not k.startswith(IGNORED_PREFIXES)), key=_natural
    )
    if unexpected:
        problems.append(f"no place in the SMT layer for {_listed(unexpected)}")
    mapped: dict[str, torch.Tensor] = {}
    mismatched = []
    for ours, theirs in names.items():
        if theirs not in checkpoint:
            continue
        tensor = checkpoint[theirs]
        if ours == "pos_embed":
            try:
                tensor = layer_position_embeddings(tensor, layer.grid)
            except ValueError as exc:
                problems.append(f"pos_embed: {exc}")
                continue
        if tensor.shape != own[ours].shape:
            mismatched.append(f"{theirs} {tuple(tensor.shape)} vs {tuple(own[ours].shape)}")
            continue
        mapped[ours] = tensor.to(own[ours].dtype)
    if mismatched:
        problems.append(f"{len(mismatched)} tensors differ in shape: {_listed(mismatched)}")
    if problems:
        raise PretrainedWeightsError(
            source,
            f"{_describe(checkpoint)} does not fit the SMT layer (width {own['norm.weight'].shape[0]}, "
            f"depth {depth}): {'; '.join(problems)}",
        )
    return mapped


def layer_position_embeddings(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """A checkpoint's ``pos_embed`` as a layer's ``(1, 1 + grid**2, D)``.

    The class-token row is kept; a checkpoint whose rows all belong to patches (timm's ``no_embed_class``:
    its class token gets no position) gives a zero class row. The patch rows are resampled to the layer's
    grid (``resample_position_embeddings``).

    Raises:
        ValueError: ``pos`` is not ``(1, tokens, width)``, or its patch rows do not form a square grid (for
            example a distillation or register token's extra rows).
    """
    if pos.dim() != 3 or pos.shape[0] != 1:
        raise ValueError(f"shape {tuple(pos.shape)} is not (1, tokens, width)")
    count = pos.shape[1]
    with_class = math.isqrt(count - 1) ** 2 == count - 1
    class_pos = pos[:, :1] if with_class else torch.zeros_like(pos[:, :1])
    patch_pos = pos[:, 1:] if with_class else pos
    return torch.cat([class_pos, resample_position_embeddings(patch_pos, grid)], dim=1)


def load_vit_into_layer(
    layer: SMTLayer, checkpoint: Mapping[str, torch.Tensor], source: str | os.PathLike = "checkpoint"
) -> None:
    """Copy a ViT ``checkpoint``'s transformer into ``layer`` (stem, head and ``f_focus`` untouched).

    Raises:
        PretrainedWeightsError: as ``vit_layer_state_dict``.
    """
    layer.load_state_dict(vit_layer_state_dict(checkpoint, layer, source), strict=False)


def load_pretrained(model: nn.Module, path: str | os.PathLike, layers: Sequence[int] = (1, 2, 3)) -> None:
    """Initialise the transformers of an ``SMT``'s ``layers`` (1, 2, 3) from the ViT checkpoint at ``path``.

    The file is read once; each chosen layer gets its own copy of the tensors, so the layers train apart
    as SMT's three encoders do (separate parameters, Sec. 3.2).

    Raises:
        ValueError: a layer number is not 1, 2 or 3.
        PretrainedWeightsError: the file is missing or unreadable, or does not fit (see
            ``vit_layer_state_dict``).
    """
    chosen = sorted(set(int(i) for i in layers))
    if not chosen or any(i not in (1, 2, 3) for i in chosen):
        raise ValueError(f"pretrained_layers must be a non-empty subset of (1, 2, 3), got {tuple(layers)}")
    checkpoint = read_vit_checkpoint(path)
    for i in chosen:
        load_vit_into_layer(getattr(model, f"layer{i}"), checkpoint, path)


def _describe(checkpoint: Mapping[str, torch.Tensor]) -> str:
    """``a width-768, depth-12 ViT``, as far as the checkpoint tells."""
    width = next((checkpoint[k].shape[-1] for k in ("cls_token", "norm.weight") if k in checkpoint), None)
    blocks = {int(m.group(1)) for k in checkpoint if (m := _BLOCK_INDEX.match(k))}
    parts = [f"width-{width}"] if width is not None else []
    parts += [f"depth-{max(blocks) + 1}"] if blocks else []
    return f"a {', '.join(parts)} ViT" if parts else "the checkpoint"


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown if len(names) <= _SHOWN else f"{shown} and {len(names) - _SHOWN} more"


def _natural(name: str) -> tuple:
    """Sort key putting ``blocks.2`` before ``blocks.10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))
