"""SMT as a MONAI Deploy App SDK application (``pip install -e .[deploy]``).

``python -m smt_monai.deploy -i SLIDES -o OUT -m model.ts`` writes the same outputs as the bundle's
``inference`` config; ``smt_monai/deploy/README.md`` covers options and packaging into a container.
"""

from smt_monai.deploy.app import SMTDeployApp, options_from_env, torchscript_model
from smt_monai.deploy.operators import (
    DeployError,
    SlideListLoaderOperator,
    SMTInferenceOperator,
    check_smt_export,
    slide_entries,
)

__all__ = [
    "DeployError",
    "SMTDeployApp",
    "SMTInferenceOperator",
    "SlideListLoaderOperator",
    "check_smt_export",
    "options_from_env",
    "slide_entries",
    "torchscript_model",
]
