r"""A sequential container that knows which certificate its outputs support."""

from torch import nn

__all__ = ["CERTIFICATE_MODES", "LipschitzSequential"]

CERTIFICATE_MODES = ("binary", "global", "classwise")


def _last_linear(module: nn.Module) -> nn.Module | None:
    for child in reversed(list(module.modules())):
        if isinstance(child, nn.Linear):
            return child
    return None


def infer_certificate_mode(module: nn.Module) -> str:
    """``"binary"`` for one output, ``"classwise"`` if the last dense layer is a
    ``FrobeniusLinear(disjoint=True)`` (each logit separately 1-Lipschitz), else ``"global"``.
    """
    last = _last_linear(module)
    if last is None:
        return "global"
    if last.out_features == 1:
        return "binary"
    if getattr(last, "disjoint", False):
        return "classwise"
    return "global"


class LipschitzSequential(nn.Sequential):
    r"""``nn.Sequential`` of 1-Lipschitz modules, with its certificate mode.

    ``certificate_mode`` says how a margin turns into an L2 radius: ``"binary"`` (one output,
    radius :math:`|f(x)|`), ``"global"`` (whole logit map 1-Lipschitz, radius
    :math:`(f_1 - f_2)/\sqrt2`) or ``"classwise"`` (each logit 1-Lipschitz, radius
    :math:`(f_1 - f_2)/2`). ``None`` infers it from the last dense layer.
    """

    def __init__(self, *modules: nn.Module, certificate_mode: str | None = None) -> None:
        super().__init__(*modules)
        if certificate_mode is None:
            certificate_mode = infer_certificate_mode(self)
        if certificate_mode not in CERTIFICATE_MODES:
            raise ValueError(
                f"certificate_mode must be one of {CERTIFICATE_MODES} or None, "
                f"got {certificate_mode!r}"
            )
        self.certificate_mode = certificate_mode
