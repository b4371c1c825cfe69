r"""1-Lipschitz ways to merge branches: a residual connection and a concatenation."""

import math

import torch
from torch import Tensor, nn

__all__ = ["LipschitzResidual", "ScaledConcat"]

_MODES = ("convex", "mean")


class LipschitzResidual(nn.Module):
    r"""Residual connection that stays 1-Lipschitz when ``block`` is.

    - ``mode="convex"``: :math:`t x + (1 - t)\,\mathrm{block}(x)` with a learnable
      :math:`t = \mathrm{sigmoid}(\tau) \in (0, 1)`, starting at :math:`t = 1/2`.
    - ``mode="mean"``: :math:`(x + \mathrm{block}(x)) / 2`.

    Lipschitz constant: :math:`t + (1 - t) L_\mathrm{block}` (``mean``: :math:`t = 1/2`).
    ``block`` must keep the shape of its input.
    """

    def __init__(self, block: nn.Module, mode: str = "convex") -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.block = block
        self.mode = mode
        if mode == "convex":
            self.logit = nn.Parameter(torch.zeros(()))

    @property
    def skip_weight(self) -> float:
        """The weight :math:`t` of the identity branch."""
        return torch.sigmoid(self.logit).item() if self.mode == "convex" else 0.5

    def forward(self, input: Tensor) -> Tensor:
        out = self.block(input)
        if out.shape != input.shape:
            raise ValueError(
                f"LipschitzResidual needs a block that keeps the shape of its input, "
                f"got {tuple(input.shape)} -> {tuple(out.shape)}"
            )
        if self.mode == "mean":
            return (input + out) / 2
        t = torch.sigmoid(self.logit)
        return t * input + (1 - t) * out

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class ScaledConcat(nn.Module):
    r"""Concatenate the branches' outputs on dim 1, divided by :math:`\sqrt{n}` (``n`` branches).

    :math:`\|\mathrm{cat}_i(f_i(x) - f_i(y))\|^2 \le \sum_i L_i^2 \|x - y\|^2`, so with
    1-Lipschitz branches the result is 1-Lipschitz (two branches: divided by :math:`\sqrt 2`).
    """

    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        if len(branches) < 1:
            raise ValueError("ScaledConcat needs at least one branch")
        self.branches = nn.ModuleList(branches)

    def forward(self, input: Tensor) -> Tensor:
        outputs = [branch(input) for branch in self.branches]
        return torch.cat(outputs, dim=1) / math.sqrt(len(outputs))
