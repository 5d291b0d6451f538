"""Patch stem: turns a ``grid`` x ``grid`` mosaic of ``patch_size`` pixel patches into one token per patch.

A 256 x 256 RGB patch is 196,608 numbers; projecting it linearly to one token (the plain ViT patch
embedding) costs 75M multiply-adds per patch at width 384 and dominates SMT's run time. The stem reduces
each patch first, because the stem's cost per input pixel is what decides SMT's speed (method-notes,
"Networks"):

1. An average pooling by ``pool``: an area downsampling, the cheapest possible first reduction (no
   parameters, one add per pixel). With the paper's geometry the last layer reads level 0 at about
   0.25 um/px, so ``pool = 4`` still leaves about 1 um/px (10x), enough to resolve nuclei.
2. Convolutions with ``kernel_size == stride`` (default two of stride 4, 32 and 128 channels, GELU):
   learned, non-overlapping reductions.
3. A final convolution whose kernel covers what is left of one patch (4 x 4 for the paper preset): the
   linear projection of the reduced patch to ``embed_dim``.

The pooling is the one step a slide reader can do instead: reading a region at ``1 / pool`` of the layer's
side (``read_size``) with area resampling gives the pooled image directly, and the per-pixel work before
the network (resize, ``normalize_he``) is then paid on ``1 / pool**2`` of the pixels. So ``forward`` takes
either full-resolution inputs and pools them, or ``pooled`` inputs and skips the pooling; the readers of the
bundle deliver pooled ones.

Every kernel equals its stride and the total reduction divides ``patch_size``, so no receptive field
crosses a patch border: token ``i`` depends only on patch ``i``. That keeps the Eq. 2 attribution of the
focusing score to patch ``i`` exact, and makes the stem equivalent to running it on each patch separately.
Measured on 2 CPU cores for one 2048 px input (grid 8, patch 256): about 11 ms for this stem plus 20 ms for
the 12-block width-384 encoder, versus about 30 ms for the stem alone with ``pool = 2``.
"""

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchStem(nn.Module):
    """Average-pool plus strided-convolution patch embedding (see the module docstring for the why).

    Args:
        patch_size: side of one patch in input pixels.
        embed_dim: width of the output tokens.
        in_channels: input channels (3 for RGB).
        pool: average-pooling factor applied first (skipped for inputs the reader already pooled).
        channels: output channels of the strided convolutions, one entry per convolution.
        strides: stride (= kernel size) of each strided convolution, same length as ``channels``.

    Raises:
        ValueError: if ``channels`` and ``strides`` differ in length, or ``patch_size`` is not divisible by
            ``pool * prod(strides)``.
    """

    def __init__(
        self,
        patch_size: int,
        embed_dim: int,
        in_channels: int = 3,
        pool: int = 4,
        channels: Sequence[int] = (32, 128),
        strides: Sequence[int] = (4, 4),
    ) -> None:
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"channels {tuple(channels)} and strides {tuple(strides)} differ in length")
        reduction = pool
        for s in strides:
            reduction *= s
        if patch_size % reduction != 0:
            raise ValueError(
                f"patch_size {patch_size} is not divisible by the stem reduction {reduction} "
                f"(pool {pool} x strides {tuple(strides)})"
            )
        self.pool = pool
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out, s in zip(channels, strides, strict=True):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=s, stride=s), nn.GELU()]
            c_in = c_out
        remaining = patch_size // reduction
        layers.append(nn.Conv2d(c_in, embed_dim, kernel_size=remaining, stride=remaining))
        self.layers = nn.Sequential(*layers)
        # Tokens at unit scale: what a patch shows must outweigh the position embeddings (std 0.02) from the
        # first step, or every patch looks alike to the focusing predictor and training collapses to the
        # class prior. He initialisation keeps the variance through the GELU convolutions; the LayerNorm
        # normalises each token (and so keeps token i a function of patch i alone).
        for layer in self.layers:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor, pooled: bool = False) -> torch.Tensor:
        """Embed ``(B, C, side, side)`` images as ``(B, grid**2, embed_dim)`` tokens.

        ``side`` is ``grid * patch_size``, or ``grid * patch_size // pool`` when ``pooled`` (the input was
        read at the pooled resolution and the pooling is skipped). Tokens are in row-major patch order, the
        order ``smt_monai.data.geometry.child_boxes`` uses.
        """
        if not pooled and self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        return self.norm(self.layers(x).flatten(2).transpose(1, 2))
