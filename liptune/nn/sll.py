r"""SLL: the SDP-based Lipschitz layer, a 1-Lipschitz residual convolution.

Araujo, Havens, Delattre, Allauzen and Hu (ICLR 2023, "A unified algebraic perspective on
Lipschitz neural networks"): for a convolution :math:`A` (kernel :math:`K` of shape
``(inner, channels, k, k)``, "same" zero padding), its adjoint :math:`A^\top` (the transposed
convolution with the same kernel), a bias :math:`b` and a diagonal :math:`T \succeq A A^\top`,

.. math:: h(x) = x - 2 A^\top T^{-1} \mathrm{ReLU}(A x + b)

is 1-Lipschitz: its Jacobian :math:`I - 2 A^\top T^{-1} D A` (:math:`D` the ReLU's 0/1 slopes)
is symmetric with eigenvalues in :math:`[-1, 1]` when :math:`T \succeq A A^\top`. The diagonal
comes from the kernel's Gram :math:`G_{jl}[\delta] = \sum_c \sum_u K_{jc}[u] K_{lc}[u + \delta]`
over the inner channels and positive weights :math:`q` (learned):

.. math:: t_j = \sum_l \sum_\delta |G_{jl}[\delta]|\, q_l / q_j,

so :math:`Q^{-1}(T - A A^\top) Q` is diagonally dominant on the plane (Gershgorin), and a
zero-padded convolution is a crop of that one, hence :math:`T \succeq A A^\top` for it too.

Why this family, per CPU second: like AOL it needs no iteration or factorisation, the
constraint is one tiny convolution of the kernel with itself per step; unlike a plain residual
``(x + block(x)) / 2`` it does not halve the skip path, so the identity's gradient norm passes
through whole: a stack of SLL layers stays gradient-norm preserving where the ReLU is off, and
Araujo et al. and Prach et al. (CVPR 2024) find it among the best certified accuracies of
residual 1-Lipschitz networks.

:func:`liptune.export.vanilla_export` turns :class:`SLLConv2d` into :class:`SLLResidual`, plain
``nn.Conv2d`` and ``nn.ConvTranspose2d`` with the scales folded into the latter's kernel;
:func:`liptune.bounds.lipschitz_bound` verifies the condition above on those weights.
"""

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from liptune.nn._validation import check_input_dims, pair, positive_finite, positive_int
from liptune.nn.parametrizations import CachedParametrization

__all__ = ["SLLConv2d", "SLLResidual", "SLLScaled", "sll_gram_row_sums"]


def sll_gram_row_sums(kernel: Tensor, q: Tensor) -> Tensor:
    r"""The weighted absolute row sums :math:`\sum_l \sum_\delta |G_{jl}[\delta]| q_l / q_j`,
    shape ``(inner,)``, of ``kernel`` ``(inner, channels, kh, kw)`` with weights ``q``
    ``(inner,)``, all > 0."""
    kh, kw = kernel.shape[-2:]
    # kernel as a batch of `inner` images of `channels` channels, filtered by itself
    gram = F.conv2d(kernel, kernel, padding=(kh - 1, kw - 1))  # (inner, inner, 2kh-1, 2kw-1)
    return (gram.abs().sum(dim=(2, 3)) @ q) / q


class SLLScaled(CachedParametrization):
    r"""``K -> 2 K / t`` per inner channel: the kernel of the SLL layer's transposed convolution.

    Holds the learned weights as :math:`q = \exp(\mathrm{log\_q})` (``(inner,)``, starting at 1).

    Args:
        inner_channels: the kernel's first dimension.
        eps: floor of :math:`t_j` (guards an all-zero inner channel).
    """

    def __init__(self, inner_channels: int, *, eps: float = 1e-12) -> None:
        super().__init__()
        self.log_q = nn.Parameter(torch.zeros(positive_int("inner_channels", inner_channels)))
        self.eps = positive_finite("eps", eps)

    def _state(self, weight: Tensor) -> tuple[Tensor, ...]:
        return (weight, self.log_q)

    def constrain(self, weight: Tensor) -> Tensor:
        q = self.log_q.to(weight.dtype).exp()
        t = torch.clamp(sll_gram_row_sums(weight, q), min=self.eps)
        return weight * (2.0 / t)[:, None, None, None]

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


def _same_padding(kernel: tuple[int, int]) -> tuple[int, int]:
    if kernel[0] % 2 == 0 or kernel[1] % 2 == 0:
        raise ValueError(
            f"SLLConv2d keeps the map's size with 'same' padding, which needs odd kernel sizes; "
            f"got kernel_size={kernel}"
        )
    return (kernel[0] - 1) // 2, (kernel[1] - 1) // 2


class SLLConv2d(nn.Module):
    r"""The SLL residual convolution :math:`x - 2 A^\top T^{-1} \mathrm{ReLU}(A x + b)`.

    1-Lipschitz for every kernel, bias and :math:`q` (module docstring); stride 1, "same" zero
    padding, odd kernels (the map keeps its shape). Initialisation: Xavier-normal kernel, zero
    bias, :math:`q = 1`.

    Args:
        channels: channels of the input and the output.
        inner_channels: channels of :math:`A x` (default ``channels``).
        kernel_size: an odd ``int`` or ``(kh, kw)``.
        eps: floor of the scales :math:`t_j`.

    Shape:
        ``(N, channels, H, W)`` to ``(N, channels, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        inner_channels: int | None = None,
        kernel_size: int | tuple[int, int] = 3,
        *,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.channels = positive_int("channels", channels)
        self.inner_channels = positive_int(
            "inner_channels", channels if inner_channels is None else inner_channels
        )
        self.kernel_size = pair("kernel_size", kernel_size)
        self.padding = _same_padding(self.kernel_size)
        self.weight = nn.Parameter(torch.empty(self.inner_channels, channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(self.inner_channels))
        self.scaled = SLLScaled(self.inner_channels, eps=eps)
        nn.init.xavier_normal_(self.weight)

    def transposed_weight(self) -> Tensor:
        """The kernel :math:`2 K / t` of the transposed convolution (cached in eval mode)."""
        return self.scaled(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        check_input_dims("SLLConv2d", tuple(input.shape), (4,), "(N, C, H, W)")
        if input.shape[1] != self.channels:
            raise ValueError(
                f"SLLConv2d({self.channels}, ...) got an input with {input.shape[1]} channels"
            )
        inner = F.relu(F.conv2d(input, self.weight, self.bias, padding=self.padding))
        return input - F.conv_transpose2d(inner, self.transposed_weight(), padding=self.padding)

    def vanilla(self) -> "SLLResidual":
        """The same map as plain ``nn.Conv2d`` and ``nn.ConvTranspose2d`` (eval-mode weights)."""
        weight = self.weight.detach()
        factory: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
        conv = nn.Conv2d(
            self.channels, self.inner_channels, self.kernel_size, padding=self.padding, **factory
        )
        transposed = nn.ConvTranspose2d(
            self.inner_channels,
            self.channels,
            self.kernel_size,
            padding=self.padding,
            bias=False,
            **factory,
        )
        with torch.no_grad():
            was_training = self.scaled.training
            self.scaled.eval()
            try:
                transposed.weight.copy_(self.transposed_weight())
            finally:
                self.scaled.train(was_training)
            conv.weight.copy_(weight)
            assert conv.bias is not None  # built with one
            conv.bias.copy_(self.bias.detach())
        return SLLResidual(conv, transposed, self.scaled.log_q.detach().exp())

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, inner_channels={self.inner_channels}, kernel_size={self.kernel_size}"
        )


class SLLResidual(nn.Module):
    r"""``x - transposed(ReLU(conv(x)))``: the exported form of :class:`SLLConv2d`.

    ``q`` (a buffer, ``(inner,)``) is the witness :func:`liptune.bounds.lipschitz_bound` checks
    the SLL condition with; any positive values are sound (a wrong witness only loosens the
    bound). Shape: ``(N, C, H, W)`` to ``(N, C, H, W)``.
    """

    q: Tensor

    def __init__(self, conv: nn.Conv2d, transposed: nn.ConvTranspose2d, q: Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.transposed = transposed
        self.register_buffer("q", q.clone())

    def forward(self, input: Tensor) -> Tensor:
        return input - self.transposed(F.relu(self.conv(input)))
