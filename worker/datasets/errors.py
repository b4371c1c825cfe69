"""The one error a data set problem raises."""

from __future__ import annotations


class DatasetError(ValueError):
    """A data set cannot be loaded: missing files, a path outside the data roots, bad classes.

    The message says what is wrong and what to install, which path to set or which flag to pass.
    """
