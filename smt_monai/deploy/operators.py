"""MONAI Deploy App SDK operators for SMT: a slide list in, focus inference with results written out.

``SlideListLoaderOperator`` turns the application's input path into slide entries and emits them once;
``SMTInferenceOperator`` receives them and runs :class:`~smt_monai.inference.SlideListPredictor`, the same
code the bundle's ``inference`` config runs, so both write the same ``predictions.csv``, ``summary.json`` and
per-slide ``focus.geojson``, ``overlay.png``, ``focus_map.nii.gz`` and ``result.json``. Results go to files
rather than to an output port: a slide list produces a folder of outputs, which is what a MONAI Application
Package hands back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monai.deploy.core import ExecutionContext, Fragment, InputContext, Operator, OperatorSpec, OutputContext
from monai.deploy.core.models import TorchScriptModel

from smt_monai.data.datalist import load_slide_list
from smt_monai.data.errors import UserError
from smt_monai.data.magnification import LayerScale
from smt_monai.inference import SlideListPredictor

logger = logging.getLogger(__name__)

SLIDES_PORT = "slides"


class DeployError(UserError, RuntimeError):
    """The application cannot run as configured; the message says what to fix (no traceback needed)."""


def slide_entries(path: Path) -> list[dict[str, Any]]:
    """Slides under ``path``: one slide file, a folder of slides, a datalist JSON, a CSV or a text list.

    A single slide is accepted because a MONAI Application Package may be given one file as its input.
    """
    return load_slide_list(path)


def check_smt_export(network: Any) -> None:
    """Check that ``network`` is an SMT TorchScript export: it carries ``read_size``, ``grid``, ``geometry``
    and ``layer3_mpp``, the geometry its readers need (``LayerScale.of``).

    Raises:
        DeployError: the model is not an SMT export of this version.
    """
    try:
        LayerScale.of(network)
    except (AttributeError, RuntimeError, ValueError):
        raise DeployError(
            "the model has no 'read_size' attribute: it is not a TorchScript export of the current "
            "smt_monai.networks.SMT (make one with `python -m monai.bundle ckpt_export network_def ...`)"
        ) from None


class SlideListLoaderOperator(Operator):
    """Emit the slide list found at ``input_path`` on the ``slides`` port.

    Named output:
        slides: list of ``{"image": path, "label": optional int}`` entries.
    """

    def __init__(self, fragment: Fragment, *args: Any, input_path: Path, **kwargs: Any) -> None:
        self.input_path = Path(input_path)
        # The base constructor calls setup(), so attributes must be set first.
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output(SLIDES_PORT)

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        slides = slide_entries(self.input_path)
        logger.info("%d slide(s) from %s", len(slides), self.input_path)
        op_output.emit(slides, SLIDES_PORT)


class SMTInferenceOperator(Operator):
    """Run SMT's focus cascade on the received slide list and write the results under ``output_folder``.

    The layer geometry and the model's own settings (K, aggregation, threshold, class names: its card) come
    from the model file itself, so the application needs no network config.

    Named input:
        slides: list of slide entries (from :class:`SlideListLoaderOperator`).
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        model: TorchScriptModel,
        output_folder: Path,
        num_focus: int | None = None,
        aggregation: str | None = None,
        threshold: float | None = None,
        default_mpp: float | None = None,
        backend: str = "auto",
        num_workers: int = 2,
        **kwargs: Any,
    ) -> None:
        self.model = model
        self.output_folder = Path(output_folder)
        self.options = {
            "num_focus": num_focus,
            "aggregation": aggregation,
            "threshold": threshold,
            "default_mpp": default_mpp,
            "backend": backend,
            "num_workers": num_workers,
        }
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(SLIDES_PORT)

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        slides = op_input.receive(SLIDES_PORT)
        # The SDK loads the TorchScript file on first access, on the GPU if there is one (as the bundle does).
        network = self.model.predictor
        device = next(network.parameters()).device
        check_smt_export(network)
        predictor = SlideListPredictor(network, slides, self.output_folder, device=device, **self.options)
        summary = predictor.run()
        logger.info(
            "%d/%d slide(s) predicted, results in %s", summary["ok"], summary["slides"], self.output_folder
        )
