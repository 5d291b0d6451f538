"""``python -m smt_monai.data.synth``: the ``smt-monai synth`` command without the rest of the CLI."""

import sys

from smt_monai.data.synth import main

sys.exit(main())
