"""Train / validation / test splits as in-memory tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch


class Split(NamedTuple):
    """Inputs ``x`` float32 in [0, 1], shaped (N, C, H, W) or (N, D), and labels ``y`` int64 (N,).

    Shared by every trial that loads the same data (they come from a cache): never modify
    them in place.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:  # the number of examples, not of fields
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> Split:
        """This split on ``device`` (itself when already there), for a whole trial."""
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class DataSplits:
    """A loaded data set: three splits and what a model needs to know about them.

    ``task`` is ``"binary"`` when two classes remain (labels 0 and 1), else ``"multiclass"``
    (labels 0 .. num_classes - 1); ``class_names[k]`` names label ``k``.
    """

    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]
    num_classes: int
    task: Literal["binary", "multiclass"]
    class_names: tuple[str, ...]
