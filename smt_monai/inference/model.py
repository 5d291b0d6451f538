"""Loading a trained SMT for inference: the eager checkpoint or its TorchScript export."""

from __future__ import annotations

import os

import torch

MODEL_FORMATS = ("checkpoint", "torchscript")


def load_network(
    network_def: torch.nn.Module | None,
    ckpt_path: str | os.PathLike,
    model_format: str = "checkpoint",
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """The network to run, in eval mode on ``device``.

    Args:
        network_def: the ``SMT`` module to load weights into (``checkpoint`` format only).
        ckpt_path: ``model.pt`` (``BestModelCheckpoint``'s ``{"model": state dict, "best_metric", ...}``, or
            a bare state dict) or ``model.ts`` (``ckpt_export`` output).
        model_format: ``checkpoint`` or ``torchscript``.
        device: where the network runs.

    Raises:
        FileNotFoundError: ``ckpt_path`` does not exist.
        ValueError: unknown ``model_format``, or ``checkpoint`` without ``network_def``.
    """
    if model_format not in MODEL_FORMATS:
        raise ValueError(f"model_format must be one of {MODEL_FORMATS}, got {model_format!r}")
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"{ckpt_path}: model file does not exist (train first, or pass --ckpt_path)")
    if model_format == "torchscript":
        network = torch.jit.load(str(ckpt_path), map_location=device)
    else:
        if network_def is None:
            raise ValueError("model_format 'checkpoint' needs network_def")
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        for key in ("model", "network"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        network_def.load_state_dict(state)
        network = network_def.to(device)
    return network.eval()
