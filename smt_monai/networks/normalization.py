"""H&E-aware intensity standardisation of the RGB images every SMT layer receives.

Brightfield H&E images are transmitted light: by the Beer-Lambert law the optical density
``OD = -log(I / I0)`` of a pixel is linear in the amounts of haematoxylin and eosin it holds, whereas raw
RGB intensity is not. The networks therefore see optical density, standardised per channel with fixed
constants (not statistics of one data set, so training, inference and deployment agree without a stats
file):

* ``OD_c = -ln((I_c + 1) / 256)`` for 8-bit intensity ``I_c``: background white (255) is OD 0 (no stain),
  black (0) is ``ln 256 ~ 5.55``.
* ``(OD_c - HE_OD_MEAN_c) / HE_OD_STD``: the means are typical OD of stained tissue per channel (eosin
  absorbs green most), the spread is that of H&E tissue textures, about 0.1 OD. Standardising matters:
  tissue textures differ by a few hundredths of OD, and with inputs of that scale (OD divided by the
  OD of strong stain, as an earlier version did) a ViT trained from scratch saw every image alike and
  collapsed to the class prior, while with unit-scale inputs the same layer separated tumour from mimic
  nuclei in a hundred steps (synthetic cohort, level 0). White background maps to the constant
  ``-HE_OD_MEAN / HE_OD_STD``, the same value the readers' white padding gets.
"""

import torch

HE_OD_MEAN: tuple[float, float, float] = (0.15, 0.25, 0.15)
"""Per-channel (R, G, B) optical density of typical stained H&E tissue, subtracted by ``normalize_he``."""

HE_OD_STD: float = 0.1
"""Spread of optical density across H&E tissue textures, the divisor of ``normalize_he``."""


def normalize_he(image: torch.Tensor) -> torch.Tensor:
    """Map 8-bit RGB H&E images to the float input of the SMT layers.

    Args:
        image: ``(..., 3, H, W)`` tensor of intensities in ``[0, 255]``, usually ``uint8`` (any dtype is
            accepted and cast to float32).

    Returns:
        ``(..., 3, H, W)`` float32 tensor ``(-ln((image + 1) / 256) - HE_OD_MEAN) / HE_OD_STD``: about zero
        mean and unit spread on stained tissue, ``-HE_OD_MEAN / HE_OD_STD`` on white background.
    """
    if image.dim() < 3 or image.shape[-3] != 3:
        raise ValueError(f"expected an RGB image with channels at dim -3, got shape {tuple(image.shape)}")
    od = -torch.log((image.to(torch.float32) + 1.0) / 256.0)
    mean = torch.tensor(HE_OD_MEAN, dtype=torch.float32, device=image.device).view(3, 1, 1)
    return (od - mean) / HE_OD_STD
