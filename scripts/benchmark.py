"""Regenerate docs/benchmarks.md: ``python scripts/benchmark.py [speed|accuracy|ablation|report|all] [...]``.

With no arguments every benchmark runs at full size, then the report; ``all --quick`` is CI's check.
"""

import sys

from smt_monai.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
