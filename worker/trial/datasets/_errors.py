"""The one error a data set problem raises."""

from __future__ import annotations


class DatasetError(ValueError):
    """A data set cannot be loaded: missing files, a path outside the data roots, bad classes.

    The message says what is wrong and what to install, which path to set or which flag to pass;
    ``field`` names the spec's field at fault where it is not ``path`` (e.g. ``classes``).
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
