"""Draw docs/images/geometry.png: what each SMT layer sees of a slide, in micrometres.

    python scripts/geometry_figure.py [--preset tiny --grid 4 --patch-size 128 --layer3-mpp 0.75]

A slide with two tissue sections (a small biopsy and a larger piece) is covered by layer-1 fields of fixed
physical side (``LayerScale.layer1_boxes``'s rule, ``layer1_fields``); one field's patch is layer 2's region,
one of whose patches is layer 3's. The sides and resolutions are those of the model config given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse, Rectangle

from smt_monai.data.geometry import layer1_fields
from smt_monai.data.magnification import LayerScale
from smt_monai.networks import SMT


def draw(scale: LayerScale, path: Path) -> Path:
    field = scale.field_um / 1000.0  # mm
    sections = np.array([[0.8, 1.2, 2.8, 3.0], [4.0, 0.6, 11.5, 6.2]])  # mm: a biopsy and a larger piece
    fields = layer1_fields(sections, field)
    fig = Figure(figsize=(15, 5.6), dpi=110)
    slide, one, two = (
        fig.add_axes(box) for box in ((0.02, 0.1, 0.5, 0.8), (0.56, 0.1, 0.2, 0.8), (0.78, 0.1, 0.2, 0.8))
    )
    slide.set_title(f"layer 1: fields of {field:.2f} mm, read at {scale.layer_mpp(1):g} um/px", fontsize=11)
    for x0, y0, x1, y1 in sections:
        slide.add_patch(Ellipse(((x0 + x1) / 2, (y0 + y1) / 2), x1 - x0, y1 - y0, fc="#e8a6c8", ec="#b06090"))
    for x, y, side in fields:
        slide.add_patch(Rectangle((x, y), side, side, fill=False, ec="#1f5fbf", lw=1.6))
    x, y, side = fields[-1]
    step = side / scale.grid
    for k in range(1, scale.grid):
        slide.plot([x + k * step] * 2, [y, y + side], color="#1f5fbf", lw=0.5)
        slide.plot([x, x + side], [y + k * step] * 2, color="#1f5fbf", lw=0.5)
    chosen = (x + step, y + 2 * step)
    slide.add_patch(Rectangle(chosen, step, step, fill=False, ec="#e0a000", lw=2.5))
    slide.set_xlim(0, 12.5)
    slide.set_ylim(7.5, 0)
    slide.set_aspect("equal")
    slide.set_xlabel("mm")
    for ax, level, colour, size in ((one, 2, "#e0a000", step), (two, 3, "#d02020", step / scale.grid)):
        ax.set_title(
            f"layer {level}: {size * 1000:.0f} um regions at {scale.layer_mpp(level):g} um/px", fontsize=11
        )
        ax.add_patch(Rectangle((0, 0), 1, 1, fc="#f2c4da", ec=colour, lw=2.5))
        for k in range(1, scale.grid):
            ax.plot([k / scale.grid] * 2, [0, 1], color=colour, lw=0.5)
            ax.plot([0, 1], [k / scale.grid] * 2, color=colour, lw=0.5)
        if level == 2:
            cell = 1 / scale.grid
            ax.add_patch(Rectangle((2 * cell, cell), cell, cell, fill=False, ec="#d02020", lw=2.5))
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(1.05, -0.05)
        ax.set_aspect("equal")
        ax.set_axis_off()
        ax.text(0.5, 1.12, f"{scale.read_size} x {scale.read_size} px as read", ha="center", fontsize=10)
    fig.savefig(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--layer3-mpp", type=float, default=0.75)
    parser.add_argument("--out", type=Path, default=Path("docs/images/geometry.png"))
    args = parser.parse_args()
    network = SMT(preset=args.preset, grid=args.grid, patch_size=args.patch_size, layer3_mpp=args.layer3_mpp)
    print(draw(LayerScale.of(network), args.out))


if __name__ == "__main__":
    main()
