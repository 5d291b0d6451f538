"""Run the SMT deploy app: ``python -m smt_monai.deploy -i SLIDES -o OUT -m model.ts``.

Also the entry point of a MONAI Application Package, which runs this file as ``python3 <app folder>``, hence
the absolute imports.
"""

from __future__ import annotations

import logging

from smt_monai.data.datalist import DatalistError
from smt_monai.deploy.app import SMTDeployApp
from smt_monai.deploy.operators import DeployError


def main() -> None:
    """Run the application; a configuration or slide-list problem exits with status 1 and a one-line reason.

    The SDK's own argument errors (``-m`` naming no file, ...) exit with argparse's status 2.
    """
    try:
        SMTDeployApp().run()
    except (DeployError, DatalistError) as exc:
        logging.getLogger("smt_monai.deploy").error("%s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
