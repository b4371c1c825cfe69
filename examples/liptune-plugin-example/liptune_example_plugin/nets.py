"""``bar-net``: a small 1-Lipschitz conv net built from liptune's layers.

A model plugin is a function ``build(input_shape, num_outputs, **params) -> torch.nn.Module``;
its keyword parameters, with their annotations and defaults, are what a study's
``model.params`` may set (``GET /models`` lists them).
"""

from __future__ import annotations

from torch import nn

from liptune import nn as lnn


class BarNet(lnn.LipschitzSequential):
    """The team's own network class: a sequence of 1-Lipschitz layers (its ``forward`` is the
    sequence's, so the guaranteed bound composes the layers' bounds). Pickled models refer to
    this class, so liptune ships this package's source with each logged model."""


def build(
    input_shape: tuple[int, ...],
    num_outputs: int,
    channels: int = 8,
    width: int = 32,
    bjorck_iterations: int = 15,
) -> nn.Module:
    """Two AOL convolutions with GroupSort2, an invertible downsampling, a dense layer and a
    1-Lipschitz head: whole-map 1-Lipschitz (global certificates), one output for a binary task.
    """
    in_channels, height, width_in = input_shape
    if height % 2 or width_in % 2:
        raise ValueError(f"bar-net needs even image sides, got {height}x{width_in}")
    features = 4 * channels * (height // 2) * (width_in // 2)
    return BarNet(
        lnn.AOLConv2d(in_channels, channels, 3, padding="same"),
        lnn.GroupSort2(),
        lnn.AOLConv2d(channels, channels, 3, padding="same"),
        lnn.GroupSort2(),
        lnn.InvertibleDownSampling(2),
        nn.Flatten(),
        lnn.SpectralLinear(features, width, bjorck_iterations=bjorck_iterations),
        lnn.GroupSort2(),
        lnn.SpectralLinear(width, num_outputs, bjorck_iterations=bjorck_iterations),
    )
