"""Print the parameter counts, FLOPs and CPU time of the SMT presets as a Markdown table (docs/networks.md).

FLOPs are those of one layer forward on one input as the readers deliver it (``read_size`` px, already pooled
by ``stem_pool``; layer 1, which has the focusing predictor), counted with
``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add is 2 FLOPs; matrix products and convolutions
only, so pooling, softmax and normalisation are not counted). PyTorch's counter has no formula for the CPU
fused-attention kernel, so one is supplied.

Usage: ``python scripts/model_stats.py [--threads 2] [--repeats 10]``
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from smt_monai.networks import PRESETS, SMT


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU fused attention: the same two matrix products as the GPU kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def layer_flops(model: SMT, x: torch.Tensor) -> tuple[int, int]:
    """Total FLOPs of one layer-1 forward of ``x`` and the part spent in the patch stem."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(x, 1)
    stem = sum(counter.get_flop_counts().get("SMT.layer1.stem", {}).values())
    return counter.get_total_flops(), stem


def layer_time_ms(model: SMT, x: torch.Tensor, repeats: int) -> float:
    """Best-of-``repeats`` wall time of one layer-1 forward of ``x`` in milliseconds (the minimum is the
    estimate least disturbed by other processes on a shared machine)."""
    times = []
    with torch.inference_mode():
        for _ in range(3):  # warm-up: first calls set up kernels and thread pools
            model(x, 1)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, 1)
            times.append(time.perf_counter() - start)
    return 1000.0 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per preset")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        "| preset | grid x patch | input read (px) | width / depth / heads | params SMT | params layer 1-2 "
        "| params layer 3 | GFLOPs / layer forward | of which stem | ms / layer forward "
        f"({args.threads} CPU threads) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, config in PRESETS.items():
        torch.manual_seed(0)
        model = SMT(config=config).eval()
        x = torch.rand(1, config.in_channels, model.read_size, model.read_size)
        total, stem = layer_flops(model, x)
        params = [sum(p.numel() for p in getattr(model, f"layer{i}").parameters()) for i in (1, 2, 3)]
        print(
            f"| {name} | {config.grid} x {config.patch_size} | {model.read_size} of {model.input_size} "
            f"| {config.embed_dim} / {config.depth} / {config.num_heads} | {sum(params) / 1e6:.2f} M "
            f"| {params[0] / 1e6:.2f} M | {params[2] / 1e6:.2f} M | {total / 1e9:.3f} | {stem / 1e9:.3f} "
            f"| {layer_time_ms(model, x, args.repeats):.1f} |"
        )


if __name__ == "__main__":
    main()
