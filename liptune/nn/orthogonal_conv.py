r"""BCOP: exactly orthogonal convolutions composed of orthogonal block convolutions.

Li et al. (NeurIPS 2019, "Preventing gradient attenuation in Lipschitz constrained
convolutional networks") and Xiao et al. (2018): for a symmetric projector
:math:`P = Q Q^\top` (:math:`Q` of shape ``(c, r)`` with orthonormal columns) the two-tap
convolution with taps :math:`[P, I - P]` along one axis is orthogonal on the plane and on every
torus: its symbol :math:`P + (I - P) z` is unitary for :math:`|z| = 1`. Composing an
orthogonal :math:`c \times c` matrix :math:`H` with ``kh - 1`` such blocks along the height and
``kw - 1`` along the width gives a ``kh x kw`` kernel whose symbol is unitary at every
frequency, i.e. an orthogonal convolution; the layer's kernel is its ``(out, in)`` corner with
``c = max(in, out)``.

What that gives (checked by ``tests/core/test_conv_families.py`` on the dense matrices):

- circular padding with total padding ``k - 1`` per axis (``"same"`` or ``(k - 1) / 2``),
  stride 1: every singular value is exactly 1 (an isometry when ``out >= in``, a co-isometry
  when ``out <= in``): gradient-norm preserving;
- zero padding of any size, any stride: a crop and subsampling of an orthogonal map on the
  plane, so the norm is at most 1 (close to 1 away from the border).

Why this family, per CPU second: it is exact without iterations. The orthogonal factors come
from one batched Householder QR of ``1 + (kh - 1) + (kw - 1)`` small matrices (``c x c`` and
``c x r``) per training step, and the kernel from ``kh + kw - 2`` two-tap compositions of
``c``-channel kernels, microseconds to a millisecond at the zoo's widths; the training step
then runs one ordinary convolution, as fast as the unconstrained twin. The original BCOP
orthogonalises with Björck iterations; QR reaches machine precision in one pass. FFT- or
Cayley-based layers (Trockman & Kolter 2021) and SOC (Singla & Feizi 2021) are exact too but
pay an FFT or a Taylor series of convolutions on every activation, not just on the weights.
"""

from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from liptune.nn._conv_checks import ConstrainedConv2d
from liptune.nn._validation import positive_int
from liptune.nn.parametrizations import CachedParametrization

__all__ = ["BCOPConv2d", "BlockOrthogonal", "compose_kernels", "orthonormal_columns"]


def orthonormal_columns(matrices: Tensor) -> Tensor:
    r"""The Q factor of the QR decomposition of ``matrices`` ``(..., m, n)``, ``m >= n``, with
    the signs of ``diag(R)``: orthonormal columns, continuous in the input, the identity on
    matrices that already have orthonormal columns."""
    q, r = torch.linalg.qr(matrices)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)


def compose_kernels(first: Tensor, second: Tensor) -> Tensor:
    r"""The kernel of ``conv(conv(x, first), second)`` (cross-correlations, no padding in
    between): ``first`` ``(m, in, a, b)``, ``second`` ``(out, m, c, d)`` give
    ``(out, in, a + c - 1, b + d - 1)`` with
    :math:`C_{oi}[t] = \sum_m \sum_{s} B_{om}[s] A_{mi}[t - s]`."""
    c, d = second.shape[-2:]
    composed = F.conv2d(first.transpose(0, 1), second.flip(-2, -1), padding=(c - 1, d - 1))
    return composed.transpose(0, 1)


class BlockOrthogonal(CachedParametrization):
    r"""Parametrisation of a BCOP kernel from a free matrix of shape ``(c, c + n r)``.

    The first ``c`` columns give the orthogonal :math:`H`, each following group of ``r``
    columns a projector :math:`Q Q^\top` of rank ``r``; the first ``kh - 1`` projectors make
    height blocks, the other ``kw - 1`` width blocks (``n = kh + kw - 2``). The result is the
    ``(out_channels, in_channels, kh, kw)`` corner of the composed ``c``-channel kernel.

    Args:
        in_channels, out_channels: the convolution's channels; ``c = max(in, out)``.
        kernel_size: ``(kh, kw)``.
        rank: the projectors' rank ``r``, ``1 <= r <= c``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], rank: int
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.channels = max(in_channels, out_channels)
        self.rank = rank
        self.height_blocks = kernel_size[0] - 1
        self.width_blocks = kernel_size[1] - 1

    @property
    def free_shape(self) -> tuple[int, int]:
        """Shape of the free matrix."""
        blocks = self.height_blocks + self.width_blocks
        return self.channels, self.channels + blocks * self.rank

    def constrain(self, weight: Tensor) -> Tensor:
        c, r = self.channels, self.rank
        kernel = orthonormal_columns(weight[:, :c])[:, :, None, None]
        blocks = self.height_blocks + self.width_blocks
        if blocks:
            columns = weight[:, c:].reshape(c, blocks, r).transpose(0, 1)
            q = orthonormal_columns(columns)
            projectors = q @ q.mT  # (blocks, c, c)
            eye = torch.eye(c, dtype=weight.dtype, device=weight.device)
            for index in range(blocks):
                taps = torch.stack((projectors[index], eye - projectors[index]), dim=-1)
                shape = (c, c, 2, 1) if index < self.height_blocks else (c, c, 1, 2)
                kernel = compose_kernels(kernel, taps.reshape(shape))
        return kernel[: self.out_channels, : self.in_channels].contiguous()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, rank={self.rank}, kernel_size={self.kernel_size}"


class BCOPConv2d(ConstrainedConv2d):
    r"""2-D convolution with an exactly orthogonal (BCOP) kernel: operator norm at most 1,
    all singular values 1 with circular ``"same"`` padding and stride 1.

    Valid for every kernel size and stride, zero padding of any size and circular padding up
    to ``(k - 1) / 2`` per side (or ``"same"``); other circular paddings are refused.

    The trained parameter is ``parametrizations.weight.original`` of shape
    ``(c, c + (kh + kw - 2) r)``, ``c = max(in, out)``; ``weight`` is the constrained kernel
    ``(out, in, kh, kw)``, recomputed at each training-mode access and cached in eval mode.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        kernel_size: ``int`` or ``(kh, kw)``.
        stride: ``int`` or ``(sh, sw)``.
        padding: ``int``, ``(ph, pw)`` or ``"same"`` (stride 1 only).
        padding_mode: ``"zeros"`` or ``"circular"``.
        bias: learn an additive bias.
        rank: rank of the block projectors; default ``max(1, c // 2)`` as in BCOP.

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
        rank: int | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, padding_mode, bias
        )
        channels = max(in_channels, out_channels)
        rank = max(1, channels // 2) if rank is None else positive_int("rank", rank)
        if rank > channels:
            raise ValueError(f"rank must be at most max(in, out) = {channels}, got {rank}")
        parametrization = BlockOrthogonal(
            in_channels, out_channels, cast(tuple[int, int], self.kernel_size), rank
        )
        factory: dict[str, Any] = {"dtype": self.weight.dtype, "device": self.weight.device}
        # The free parameter is a matrix, not a kernel: replace it before registering.
        del self.weight
        self.weight = nn.Parameter(torch.empty(parametrization.free_shape, **factory))
        self._init_free(self.weight)
        parametrize.register_parametrization(self, "weight", parametrization, unsafe=True)

    @staticmethod
    def _init_free(free: Tensor) -> None:
        with torch.no_grad():
            nn.init.normal_(free)

    def reset_parameters(self) -> None:
        # nn.Conv2d.__init__ calls this before the free matrix exists; it is drawn afterwards.
        if parametrize.is_parametrized(self, "weight"):
            self._init_free(
                cast(Tensor, cast(nn.ModuleDict, self.parametrizations)["weight"].original)
            )
        if self.bias is not None:
            nn.init.zeros_(self.bias)
