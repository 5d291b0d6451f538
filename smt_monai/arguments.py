"""Types of command-line options (``smt-monai`` and its ``benchmark`` commands): a value no run could use
is refused by argparse, naming the option, before anything is read or trained."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def at_least(low: int) -> Callable[[str], int]:
    """A whole number of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
        return value

    return parse


def positive(text: str) -> float:
    """A finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def device(text: str) -> str:
    """A device this machine has (:func:`smt_monai.utils.usable_device`), kept as written."""
    from smt_monai.data.errors import OptionError
    from smt_monai.utils import usable_device

    try:
        usable_device(text)
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
