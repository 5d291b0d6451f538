"""smt-monai: the Self-reform Multilayer Transformer (SMT) for whole-slide images, as a MONAI bundle.

Subpackages load on first use (``smt_monai.data``, ``smt_monai.networks``, ...), so that bundle configs can
``$import smt_monai`` once and refer to any of them without importing everything up front.
"""

import importlib
from types import ModuleType

__version__ = "0.5.0"

_SUBPACKAGES = (
    "data",
    "networks",
    "focus",
    "losses",
    "cascade",
    "engines",
    "handlers",
    "inference",
    "baselines",
    "benchmark",
    "deploy",
    "utils",
)


def __getattr__(name: str) -> ModuleType:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"smt_monai.{name}")
    raise AttributeError(f"module 'smt_monai' has no attribute {name!r}")
