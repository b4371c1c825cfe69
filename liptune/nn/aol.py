r"""AOL: almost-orthogonal convolution by a rescaling of the input channels.

Prach & Lampert (ECCV 2022, "Almost-orthogonal layers for efficient general-purpose Lipschitz
networks"): for any matrix :math:`W`, with
:math:`d_i = (\sum_j |W^\top W|_{ij})^{-1/2}` and :math:`D = \mathrm{diag}(d)`,
:math:`\|W D\|_2 \le 1` (the row sums of :math:`|D W^\top W D|` are at most 1, and a symmetric
matrix's norm is at most its largest absolute row sum). For a convolution with kernel
:math:`K` of shape ``(out, in, kh, kw)`` the matrix :math:`W^\top W` is the stride-1
convolution with the Gram kernel

.. math:: G_{ij}[\delta] = \sum_o \sum_u K_{o i}[u]\, K_{o j}[u + \delta],
   \qquad \delta \in [-(kh-1), kh-1] \times [-(kw-1), kw-1],

so :math:`d_i = (\sum_j \sum_\delta |G_{ij}[\delta]|)^{-1/2}` depends only on the input
channel :math:`i`, and the layer's kernel is :math:`K_{oi} d_i`: one more ordinary
convolution, exported as such.

Why this family, per CPU second: no iterations, no matrix factorisation, no power-iteration
state; the constraint costs one tiny convolution of the kernel with itself (``in`` images of
``out`` channels and ``kh x kw`` pixels) per training step, a fraction of a millisecond for the
zoo's widths, so the training step runs at the unconstrained convolution's speed. It is
1-Lipschitz by construction for every kernel, and exactly orthogonal when the kernel's
columns already are (e.g. at the orthogonal-centre-tap initialisation); Prach et al.
(CVPR 2024) find it among the best certified accuracies per training hour.
"""

from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from liptune.nn._conv_checks import ConstrainedConv2d
from liptune.nn._validation import positive_finite
from liptune.nn.parametrizations import CachedParametrization

__all__ = ["AOLConv2d", "AOLRescaled", "aol_scales"]


def aol_scales(kernel: Tensor, eps: float = 1e-12) -> Tensor:
    r"""The AOL input-channel scales :math:`d` of shape ``(in,)`` for ``kernel``
    ``(out, in, kh, kw)``: :math:`d_i = \max(\sum_j \sum_\delta |G_{ij}[\delta]|, \epsilon)^{-1/2}`.
    """
    kh, kw = kernel.shape[-2:]
    by_input = kernel.transpose(0, 1)  # (in, out, kh, kw): one "image" per input channel
    gram = F.conv2d(by_input, by_input, padding=(kh - 1, kw - 1))  # (in, in, 2kh-1, 2kw-1)
    row_sums = gram.abs().sum(dim=(1, 2, 3))
    return torch.rsqrt(torch.clamp(row_sums, min=eps))


class AOLRescaled(CachedParametrization):
    r"""Parametrisation ``K -> K * d`` (input channels scaled by :func:`aol_scales`).

    Args:
        eps: floor of the row sums (guards a kernel whose input channel is all zeros).
    """

    def __init__(self, *, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = positive_finite("eps", eps)

    def constrain(self, weight: Tensor) -> Tensor:
        return weight * aol_scales(weight, self.eps)[None, :, None, None]

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


class AOLConv2d(ConstrainedConv2d):
    r"""2-D convolution with AOL rescaling: its operator norm is at most 1.

    Valid for every kernel size and stride, zero padding of any size and circular padding
    up to ``(k - 1) / 2`` per side (or ``"same"``); other circular paddings are refused
    (see :mod:`liptune.nn._conv_checks`).

    Initialisation: an orthogonal ``(out, in)`` matrix on the centre tap (top-left of centre
    for even kernels), zeros elsewhere, so the layer starts as an orthogonal 1x1 convolution
    (norm-preserving when ``out >= in``) and AOL leaves it unchanged.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        kernel_size: ``int`` or ``(kh, kw)``.
        stride: ``int`` or ``(sh, sw)``.
        padding: ``int``, ``(ph, pw)`` or ``"same"`` (stride 1 only).
        padding_mode: ``"zeros"`` or ``"circular"``.
        bias: learn an additive bias.
        eps: floor of the AOL row sums.

    Shape:
        input ``(N, in_channels, H, W)``, output ``(N, out_channels, H', W')`` with the sizes
        of ``nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        padding_mode: str = "zeros",
        bias: bool = True,
        *,
        eps: float = 1e-12,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, padding_mode, bias
        )
        parametrize.register_parametrization(self, "weight", AOLRescaled(eps=eps))

    def reset_parameters(self) -> None:
        kh, kw = self.kernel_size
        free = cast(
            Tensor,
            cast(nn.ModuleDict, self.parametrizations)["weight"].original
            if parametrize.is_parametrized(self, "weight")
            else self.weight,
        )
        with torch.no_grad():
            free.zero_()
            nn.init.orthogonal_(free[:, :, (kh - 1) // 2, (kw - 1) // 2])
        if self.bias is not None:
            nn.init.zeros_(self.bias)
