"""The one error type raised for slides that cannot be used."""

from __future__ import annotations

import os


class SlideReadError(Exception):
    """A slide could not be opened or read, or is not an 8-bit RGB image.

    The message always names the file and the problem, on one line, so batch tools can log it as is.
    """

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")
