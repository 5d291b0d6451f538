"""The errors that mean "what you gave cannot be used", and the one raised for unusable slides."""

from __future__ import annotations

import os


class UserError(Exception):
    """A problem with what the user gave (a slide, a list, a model file, a folder, an option), said in one
    line that names it: the command line prints that line and exits with status 2, without a traceback."""


class OptionError(UserError, ValueError):
    """An option's value is not one the method accepts (e.g. an unknown ``aggregation``)."""


class SlideReadError(UserError):
    """A slide could not be opened or read, or is not an 8-bit RGB image.

    The message always names the file and the problem, on one line, so batch tools can log it as is.
    """

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")
