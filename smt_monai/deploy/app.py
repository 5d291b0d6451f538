"""SMT whole-slide classification as a MONAI Deploy App SDK application.

The App SDK owns the command line: ``-i`` the slides (a folder, one slide, a datalist JSON, a CSV or a text
list), ``-o`` the output folder, ``-m`` the TorchScript model (``ckpt_export`` output, or a MONAI Application
Package's ``models/`` folder holding it), ``-l`` the log level; ``HOLOSCAN_INPUT_PATH``,
``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH`` stand in for them. Its parser rejects any other flag, so
the inference options come from the environment, which is also how a packaged container is configured.
Unset, K, the aggregation and the threshold are the model's own (its card, carried in the export):

===================== ======== ====================================================
``SMT_NUM_FOCUS``     model's  ``K``, patches magnified per region
``SMT_AGGREGATION``   model's  ``max`` or ``mean`` over the layer-3 regions
``SMT_THRESHOLD``     model's  decision threshold on P(positive) of a binary model
``SMT_DEFAULT_MPP``   none     the scanner's level-0 um/px for slides whose file holds none
``SMT_BACKEND``       ``auto`` slide reader: ``auto``, ``cucim``, ``openslide``, ``tifffile``
``SMT_NUM_WORKERS``   ``2``    region-reading threads
===================== ======== ====================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application
from monai.deploy.core.models import TorchScriptModel

from smt_monai.cascade.prediction import AGGREGATIONS
from smt_monai.data.slide import BACKENDS
from smt_monai.deploy.operators import DeployError, SlideListLoaderOperator, SMTInferenceOperator


def _positive_int(environ: Mapping[str, str], name: str, default: int | None) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise DeployError(f"{name}={value!r}: expected a positive integer")
    return int(value)


def _positive_float(environ: Mapping[str, str], name: str) -> float | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0:
        raise DeployError(f"{name}={value!r}: expected a positive number")
    return number


def _choice(
    environ: Mapping[str, str], name: str, default: str | None, choices: tuple[str, ...]
) -> str | None:
    value = environ.get(name, "").strip() or default
    if value is not None and value not in choices:
        raise DeployError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def options_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Inference options from ``SMT_*`` environment variables; ``None``: the model's own.

    Raises:
        DeployError: a variable holds a value the predictor cannot use.
    """
    return {
        "num_focus": _positive_int(environ, "SMT_NUM_FOCUS", None),
        "aggregation": _choice(environ, "SMT_AGGREGATION", None, AGGREGATIONS),
        "threshold": _positive_float(environ, "SMT_THRESHOLD"),
        "default_mpp": _positive_float(environ, "SMT_DEFAULT_MPP"),
        "backend": _choice(environ, "SMT_BACKEND", "auto", ("auto", *BACKENDS)),
        "num_workers": _positive_int(environ, "SMT_NUM_WORKERS", 2),
    }


def torchscript_model(app_context: AppContext) -> TorchScriptModel:
    """The TorchScript model the SDK found at the model path (a file, or a folder holding one named model).

    Raises:
        DeployError: no TorchScript model there.
    """
    models = app_context.models
    model = models.get() if models else None
    if not isinstance(model, TorchScriptModel):
        raise DeployError(
            f"{Path(app_context.model_path).absolute()}: no TorchScript model found; pass -m MODEL.ts "
            "(the bundle's ckpt_export output) or set HOLOSCAN_MODEL_PATH"
        )
    return model


class SMTDeployApp(Application):
    """Slides in, SMT focus inference, predictions and per-slide focus outputs out.

    Two operators run once each: :class:`SlideListLoaderOperator` emits the slide list to
    :class:`SMTInferenceOperator`, which writes ``predictions.csv``, ``summary.json`` and ``<slide id>/``
    into the output folder, exactly as ``python -m monai.bundle run inference`` does with the same model and
    options.
    """

    name = "smt_monai_deploy"
    description = "SMT (Self-reform Multilayer Transformer) whole-slide image classification by focusing."
    version = "0.1.0"

    def compose(self) -> None:
        app_context = Application.init_app_context(self.argv)
        options = options_from_env()
        model = torchscript_model(app_context)
        loader = SlideListLoaderOperator(
            self, CountCondition(self, 1), input_path=Path(app_context.input_path), name="slide_list_loader"
        )
        inference = SMTInferenceOperator(
            self, model=model, output_folder=Path(app_context.output_path), name="smt_inference", **options
        )
        self.add_flow(loader, inference, {("slides", "slides")})
