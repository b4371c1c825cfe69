r"""Gradient-norm-preserving (GNP) activations, applied on the channel dimension (dim 1).

All of them accept ``(N, C)`` and ``(N, C, H, W)`` inputs (any ``(N, C, *)``). GroupSort,
GroupSort2, FullSort and HouseHolder permute or reflect the input locally, so their Jacobian
is orthogonal almost everywhere: :math:`\|J^\top v\| = \|v\|`. MaxMin doubles the channels and
is an isometry (:math:`J^\top J = I`).
"""

import math
from typing import Any

import torch
from torch import Tensor, nn

from liptune.nn._validation import check_channels_divisible, check_input_dims, positive_int

__all__ = ["FullSort", "GroupSort", "GroupSort2", "HouseHolder", "MaxMin"]


def _check_channels(layer: str, input: Tensor, group_size: int) -> None:
    check_input_dims(layer, input.shape, tuple(range(2, 9)), "(N, C) or (N, C, H, W)")
    check_channels_divisible(layer, input.shape[1], group_size)


def _pairs(input: Tensor) -> tuple[Tensor, Tensor]:
    """Split channels into adjacent pairs: channels 2i and 2i+1, each ``(N, C/2, *)``."""
    grouped = input.reshape(input.shape[0], input.shape[1] // 2, 2, *input.shape[2:])
    return grouped[:, :, 0], grouped[:, :, 1]


class GroupSort(nn.Module):
    r"""Sort each group of ``group_size`` consecutive channels in ascending order.

    Shape: ``(N, C, *)`` to ``(N, C, *)``; ``group_size`` must divide ``C``.
    """

    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.group_size = positive_int("group_size", group_size)

    def forward(self, input: Tensor) -> Tensor:
        _check_channels(f"GroupSort(group_size={self.group_size})", input, self.group_size)
        n, c = input.shape[:2]
        grouped = input.reshape(n, c // self.group_size, self.group_size, *input.shape[2:])
        return grouped.sort(dim=2).values.reshape(input.shape)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


def _sort_pairs(input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(min, max) of channel pairs, and the two members of each pair as strided views."""
    pairs = input.reshape(input.shape[0], input.shape[1] // 2, 2, -1)
    first, second = pairs[:, :, 0], pairs[:, :, 1]
    out = torch.empty_like(pairs)
    torch.minimum(first, second, out=out[:, :, 0])
    torch.maximum(first, second, out=out[:, :, 1])
    return out.view(input.shape), first, second


class _SortPairs(torch.autograd.Function):
    r"""(min, max) of channel pairs, with the permutation kept as a 0/1 mask for backward.

    Forward and backward each write into the halves of one preallocated tensor instead of
    building a ``stack``. The mask :math:`m` (1 where the pair was swapped) is written by
    ``gt`` directly in the input's dtype, and the backward is two ``lerp`` passes,
    :math:`g_{first} = \mathrm{lerp}(g_{low}, g_{high}, m)` and
    :math:`g_{second} = \mathrm{lerp}(g_{high}, g_{low}, m)`: with weights 0 and 1 ``lerp``
    returns one of its ends exactly, and it is about 3x faster on CPU than boolean ``where``.
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor) -> Tensor:
        out, first, second = _sort_pairs(input)
        swapped = torch.empty_like(first)
        torch.gt(first, second, out=swapped)
        ctx.save_for_backward(swapped)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (swapped,) = ctx.saved_tensors
        pairs = grad.reshape(grad.shape[0], grad.shape[1] // 2, 2, -1)
        low, high = pairs[:, :, 0], pairs[:, :, 1]
        out = torch.empty_like(pairs)
        torch.lerp(low, high, swapped, out=out[:, :, 0])
        torch.lerp(high, low, swapped, out=out[:, :, 1])
        return out.view(grad.shape)


class GroupSort2(nn.Module):
    r"""GroupSort with groups of 2: each pair of channels ``(2i, 2i+1)`` becomes (min, max).

    Computed with element-wise ``minimum``/``maximum`` instead of a sort. At ties the pair is
    passed through unchanged, so the Jacobian stays a permutation there too.

    Shape: ``(N, C, *)`` to ``(N, C, *)`` with ``C`` even.
    """

    def forward(self, input: Tensor) -> Tensor:
        _check_channels("GroupSort2", input, 2)
        if torch.is_grad_enabled() and input.requires_grad:
            return _SortPairs.apply(input)
        return _sort_pairs(input)[0]


class FullSort(nn.Module):
    r"""Sort all channels in ascending order (GroupSort with one group).

    Shape: ``(N, C, *)`` to ``(N, C, *)``.
    """

    def forward(self, input: Tensor) -> Tensor:
        check_input_dims("FullSort", input.shape, tuple(range(2, 9)), "(N, C) or (N, C, H, W)")
        return input.sort(dim=1).values


class MaxMin(nn.Module):
    r""":math:`[\max(x, 0), \max(-x, 0)]` concatenated on the channel dimension.

    The output has twice the channels and the same norm as the input (an isometry:
    :math:`\|\mathrm{MaxMin}(x)\| = \|x\|` and :math:`J^\top J = I`), hence 1-Lipschitz.

    Shape: ``(N, C, *)`` to ``(N, 2C, *)``.
    """

    def forward(self, input: Tensor) -> Tensor:
        check_input_dims("MaxMin", input.shape, tuple(range(2, 9)), "(N, C) or (N, C, H, W)")
        return torch.cat((torch.relu(input), torch.relu(-input)), dim=1)


class HouseHolder(nn.Module):
    r"""Learnable Householder reflection on each pair of channels ``(2i, 2i+1)``.

    With :math:`v_i = (\cos\theta_i, \sin\theta_i)` and :math:`z` a pair,

    .. math:: \sigma(z) = z - 2 \min(v_i^\top z, 0)\, v_i

    is the identity on the half-plane :math:`v_i^\top z \ge 0` and the reflection
    :math:`I - 2 v_i v_i^\top` on the other, continuous on the boundary: the Jacobian is
    orthogonal almost everywhere. :math:`\theta_i` starts at :math:`3\pi/4`, where the layer
    equals :class:`GroupSort2`.

    Args:
        channels: number of channels ``C`` (even).

    Shape: ``(N, C, *)`` to ``(N, C, *)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        positive_int("channels", channels)
        if channels % 2:
            raise ValueError(
                f"HouseHolder reflects pairs of channels: channels must be even, got {channels}"
            )
        self.channels = channels
        self.theta = nn.Parameter(torch.full((channels // 2,), 3 * math.pi / 4))

    def forward(self, input: Tensor) -> Tensor:
        check_input_dims("HouseHolder", input.shape, tuple(range(2, 9)), "(N, C) or (N, C, H, W)")
        if input.shape[1] != self.channels:
            raise ValueError(
                f"HouseHolder(channels={self.channels}) got an input with {input.shape[1]} "
                f"channels (shape {tuple(input.shape)})"
            )
        first, second = _pairs(input)
        theta = self.theta.reshape(-1, *([1] * (input.dim() - 2)))
        cos, sin = torch.cos(theta), torch.sin(theta)
        projection = torch.clamp(first * cos + second * sin, max=0.0)
        out = torch.stack((first - 2 * projection * cos, second - 2 * projection * sin), dim=2)
        return out.reshape(input.shape)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
