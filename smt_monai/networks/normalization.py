"""H&E-aware intensity normalisation of the RGB images every SMT layer receives.

Brightfield H&E images are transmitted light: by the Beer-Lambert law the optical density
``OD = -log(I / I0)`` of a pixel is linear in the amounts of haematoxylin and eosin it holds, whereas raw
RGB intensity is not. The networks therefore see optical density, divided per channel by a fixed constant
(not a data-set statistic, so training, inference and deployment agree without a stats file):

* ``OD_c = -ln((I_c + 1) / 256)`` for 8-bit intensity ``I_c``: background white (255) maps to exactly 0
  in every channel, which is also what zero padding and the slide readers' white fill mean (no stain);
  black (0) maps to ``ln 256 ~ 5.55``.
* ``HE_OD_SCALE`` is the OD that Macenko et al.'s reference stain matrix reaches at its reference maximum
  concentrations (``HERef @ maxCRef`` with ``HERef = [[0.5626, 0.2159], [0.7201, 0.8012], [0.4062,
  0.5581]]``, ``maxCRef = [1.9705, 1.0308]``; M. Macenko et al., "A method for normalizing histology slides
  for quantitative analysis", ISBI 2009, as used by the common reference implementations). Dividing by it
  maps strongly stained tissue to about 1 per channel, so the inputs are O(1) like a standardised image.
"""

import torch

HE_OD_SCALE: tuple[float, float, float] = (1.3312, 2.2448, 1.3757)
"""Per-channel (R, G, B) optical density of strongly stained H&E tissue, the divisor of ``normalize_he``."""


def normalize_he(image: torch.Tensor) -> torch.Tensor:
    """Map 8-bit RGB H&E images to the float input of the SMT layers.

    Args:
        image: ``(..., 3, H, W)`` tensor of intensities in ``[0, 255]``, usually ``uint8`` (any dtype is
            accepted and cast to float32).

    Returns:
        ``(..., 3, H, W)`` float32 tensor ``-ln((image + 1) / 256) / HE_OD_SCALE``: white is 0 in every
        channel, strongly stained tissue is about 1, black is at most ``ln 256 / 1.33 ~ 4.2``.
    """
    if image.dim() < 3 or image.shape[-3] != 3:
        raise ValueError(f"expected an RGB image with channels at dim -3, got shape {tuple(image.shape)}")
    od = -torch.log((image.to(torch.float32) + 1.0) / 256.0)
    scale = torch.tensor(HE_OD_SCALE, dtype=torch.float32, device=image.device).view(3, 1, 1)
    return od / scale
