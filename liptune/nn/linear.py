r"""1-Lipschitz dense layers: :math:`y = W x + b` with :math:`\|W\|_2 \le 1`.

Each layer is an ``nn.Linear`` whose ``weight`` is parametrised
(:mod:`torch.nn.utils.parametrize`): ``layer.weight`` is the constrained weight,
``layer.parametrizations.weight.original`` the free parameter the optimizer updates.
"""

from torch import Tensor, nn
from torch.nn.utils import parametrize

from liptune.nn._validation import positive_int
from liptune.nn.parametrizations import BjorckSpectral, FrobeniusNormalized, QROrthogonal

__all__ = ["FrobeniusLinear", "OrthoLinear", "SpectralLinear"]


class _ConstrainedLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        positive_int("in_features", in_features)
        positive_int("out_features", out_features)
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.orthogonal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape (*, {self.in_features}), "
                f"got {tuple(input.shape)}"
            )
        return super().forward(input)


class SpectralLinear(_ConstrainedLinear):
    r"""Dense layer with all singular values of :math:`W` close to 1.

    The weight is spectrally normalised by power iteration (persistent vectors, updated in
    training mode), then orthonormalised by Björck's iteration, so the layer is 1-Lipschitz
    and, with Björck, gradient-norm preserving on its input space.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        power_iterations: power-iteration steps per training step (>= 1).
        bjorck_iterations: maximum Björck steps; ``0`` disables Björck (spectral norm only).
        bjorck_tolerance: Björck stops early once :math:`\|W W^\top - I\|_F` is below it.

    Shape:
        input ``(*, in_features)``, output ``(*, out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        power_iterations: int = 1,
        bjorck_iterations: int = 15,
        bjorck_tolerance: float = 1e-4,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        parametrize.register_parametrization(
            self,
            "weight",
            BjorckSpectral(
                self.weight,
                power_iterations=power_iterations,
                bjorck_iterations=bjorck_iterations,
                bjorck_tolerance=bjorck_tolerance,
            ),
        )


class FrobeniusLinear(_ConstrainedLinear):
    r"""Dense layer with :math:`W / \|W\|_F`, or each row normalised (``disjoint=True``).

    With ``disjoint=False`` the whole map is 1-Lipschitz (:math:`\|W\|_2 \le \|W\|_F = 1`); for
    one output it is exactly the unit-norm linear functional. With ``disjoint=True`` every
    output is separately 1-Lipschitz, which is what a "classwise" certificate needs.

    Shape:
        input ``(*, in_features)``, output ``(*, out_features)``.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, disjoint: bool = False
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.disjoint = bool(disjoint)
        parametrize.register_parametrization(
            self, "weight", FrobeniusNormalized(disjoint=self.disjoint)
        )


class OrthoLinear(_ConstrainedLinear):
    r"""Dense layer with an exactly orthogonal weight (QR factor of the free weight).

    For ``out_features >= in_features`` the columns are orthonormal (an isometry), otherwise
    the rows are; all singular values are 1 up to floating-point rounding.

    Shape:
        input ``(*, in_features)``, output ``(*, out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        parametrize.register_parametrization(self, "weight", QROrthogonal())
