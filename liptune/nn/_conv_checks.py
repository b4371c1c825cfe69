"""The base of the 1-Lipschitz convolutions of :mod:`liptune.nn.conv`, :mod:`liptune.nn.aol`
and :mod:`liptune.nn.orthogonal_conv`: their argument checks and their checked forward.

The layers bound the norm of the stride-1 convolution on the infinite (zero-padded) plane or
on the torus. A zero-padded convolution is a crop of one on the plane, a strided one keeps a
subset of the stride-1 outputs, so both stay within that bound. A circular convolution whose
total padding along an axis exceeds ``k - 1`` repeats output rows (the padded image holds the
wrap-around twice), which can raise the norm above the bound: those paddings are refused.
"""

from typing import Literal, cast

from torch import Tensor, nn

from liptune.nn._validation import check_input_dims, pair, positive_int

__all__ = ["ConstrainedConv2d", "check_conv_arguments"]

PADDING_MODES = ("zeros", "circular")


def check_conv_arguments(
    layer: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] | str,
    padding_mode: str,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validate a constrained convolution's arguments; return ``(kernel, stride)`` as pairs.

    Raises ``ValueError`` naming ``layer`` and the argument that is not allowed.
    """
    positive_int("in_channels", in_channels)
    positive_int("out_channels", out_channels)
    kernel = pair("kernel_size", kernel_size)
    strides = pair("stride", stride)
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"{layer}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}"
        )
    if isinstance(padding, str):
        if padding != "same":
            raise ValueError(f'{layer}: padding must be an int, a pair or "same", got {padding!r}')
        if strides != (1, 1):
            raise ValueError(f'{layer}: padding="same" needs stride 1, got stride={strides}')
        return kernel, strides
    paddings = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if len(paddings) != 2 or any(
        isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in paddings
    ):
        raise ValueError(f"{layer}: padding must be integers >= 0, got {padding!r}")
    if padding_mode == "circular":
        for axis, p, k in zip(("height", "width"), paddings, kernel, strict=True):
            if 2 * p > k - 1:
                raise ValueError(
                    f"{layer}: circular padding {p} along the {axis} exceeds (k - 1) / 2 = "
                    f"{(k - 1) / 2:g} for kernel size {k}: the wrap-around would be seen twice "
                    f"and the layer would not be 1-Lipschitz; use padding <= {(k - 1) // 2} "
                    'or "same"'
                )
    return kernel, strides


class ConstrainedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose arguments pass :func:`check_conv_arguments` and whose forward
    names the layer when the input is not ``(N, in_channels, H, W)``; subclasses register the
    ``weight`` parametrisation that makes it 1-Lipschitz."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int],
        padding: int | tuple[int, int] | str,
        padding_mode: str,
        bias: bool,
    ) -> None:
        kernel, strides = check_conv_arguments(
            type(self).__name__,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            padding_mode,
        )
        super().__init__(
            in_channels,
            out_channels,
            kernel,
            stride=strides,
            padding=padding,
            padding_mode=cast(Literal["zeros", "circular"], padding_mode),  # checked above
            bias=bias,
        )

    def forward(self, input: Tensor) -> Tensor:
        check_input_dims(type(self).__name__, input.shape, (4,), "4-D (N, C, H, W)")
        if input.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_channels} input channels, "
                f"got {input.shape[1]} (input shape {tuple(input.shape)})"
            )
        return self._conv_forward(input, self.weight, self.bias)
