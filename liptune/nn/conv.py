r"""1-Lipschitz 2-D convolution.

The kernel of shape ``(out, in, kh, kw)`` is reshaped to the matrix ``(out, in*kh*kw)``,
spectrally normalised and orthonormalised like :class:`~liptune.nn.SpectralLinear`, then
multiplied by :math:`1/\sqrt{\lceil kh/sh \rceil \lceil kw/sw \rceil}`. Each input pixel is
seen by at most :math:`\lceil kh/sh \rceil \lceil kw/sw \rceil` output positions, so
:math:`\|\mathrm{conv}\|_2 \le \sqrt{\lceil kh/sh \rceil \lceil kw/sw \rceil}\,\|W\|_2`, and
the scaled layer is 1-Lipschitz for zero and circular padding alike (circular padding at most
the kernel's half-width: more would wrap the image around twice and is refused).
"""

import math

from torch import nn
from torch.nn.utils import parametrize

from liptune.nn._conv_checks import ConstrainedConv2d
from liptune.nn.parametrizations import BjorckSpectral

__all__ = ["SpectralConv2d"]


class SpectralConv2d(ConstrainedConv2d):
    r"""2-D convolution whose operator norm is at most 1.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        kernel_size: ``int`` or ``(kh, kw)``.
        stride: ``int`` or ``(sh, sw)``.
        padding: ``int``, ``(ph, pw)`` or ``"same"`` (stride 1 only; even kernels pad one
            more pixel at the bottom/right, as ``nn.Conv2d`` does).
        padding_mode: ``"zeros"`` or ``"circular"``.
        bias: learn an additive bias.
        power_iterations: power-iteration steps per training step (>= 1).
        bjorck_iterations: maximum Björck steps; ``0`` disables Björck.
        bjorck_tolerance: Björck stops early once :math:`\|W W^\top - I\|_F` is below it.

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
        power_iterations: int = 1,
        bjorck_iterations: int = 15,
        bjorck_tolerance: float = 1e-4,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, padding_mode, bias
        )
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        overlap = math.ceil(kh / sh) * math.ceil(kw / sw)
        parametrize.register_parametrization(
            self,
            "weight",
            BjorckSpectral(
                self.weight,
                power_iterations=power_iterations,
                bjorck_iterations=bjorck_iterations,
                bjorck_tolerance=bjorck_tolerance,
                scale=1.0 / math.sqrt(overlap),
            ),
        )

    def reset_parameters(self) -> None:
        nn.init.orthogonal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
