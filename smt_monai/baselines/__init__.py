"""Baselines SMT is measured against: the dense tile-everything pipeline with attention-MIL pooling."""

from smt_monai.baselines.dense import (
    DenseEvaluator,
    DenseMIL,
    DenseMILLoss,
    LoadTileBagd,
    predict_dense,
    prepare_bag_batch,
    read_tiles,
    slide_tiles,
    tile_side,
    tile_tissue,
    validated_decision,
)

__all__ = [
    "DenseEvaluator",
    "DenseMIL",
    "DenseMILLoss",
    "LoadTileBagd",
    "predict_dense",
    "prepare_bag_batch",
    "read_tiles",
    "slide_tiles",
    "tile_side",
    "tile_tissue",
    "validated_decision",
]
