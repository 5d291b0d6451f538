"""``python -m smt_monai`` runs the ``smt-monai`` command."""

import sys

from smt_monai.cli import main

sys.exit(main())
