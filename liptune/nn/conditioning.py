r"""Loss-conditioned 1-Lipschitz networks: FiLM layers whose scale is bounded by 1.

A conditioned network :math:`f(x, t)` takes, besides the input :math:`x`, a condition
:math:`t \in \mathbb{R}^k` (normalised loss hyper-parameters, e.g. the log-temperature of
tau-cross-entropy mapped to :math:`[-1, 1]` by :class:`LogRange`). After a constrained layer
:math:`z = W x + b` a :class:`FiLM` layer computes, per channel :math:`c`,

.. math::

    \mathrm{FiLM}(z, t)_c = \gamma_c(t)\, z_c + \beta_c(t), \qquad |\gamma_c(t)| \le 1,

with :math:`\gamma` and :math:`\beta` produced by a small network of :math:`t` alone. For a
fixed :math:`t` the layer is the affine map :math:`z \mapsto \mathrm{diag}(\gamma) z + \beta`,
whose Lipschitz constant is :math:`\max_c |\gamma_c| \le 1` (the shift does not depend on
:math:`x` and costs nothing). So :math:`x \mapsto f(x, t)` is 1-Lipschitz for each fixed
:math:`t` whenever the other layers are, and the certificate of the network at :math:`t` is the
usual one. Nothing is promised about how :math:`f` varies with :math:`t`, and nothing needs to be.

Placed right after a constrained ``nn.Linear``/``nn.Conv2d`` and before the activation, the
layer folds into it at a fixed condition: rows (output channels) of :math:`W` scaled by
:math:`\gamma`, bias :math:`\gamma \odot b + \beta`
(:func:`liptune.export.vanilla_export_at`); :math:`\|\mathrm{diag}(\gamma) W\|_2 \le \|W\|_2`,
and each row's norm can only shrink, so a classwise head stays classwise.

:func:`conditioned` turns a zoo network (a sequence of layers) into a
:class:`ConditionedSequential` with a FiLM layer after each top-level constrained layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor, nn

from liptune.nn._validation import positive_int
from liptune.nn.containers import CERTIFICATE_MODES, LipschitzSequential, infer_certificate_mode

__all__ = [
    "ConditionedSequential",
    "FiLM",
    "FixedCondition",
    "LinearRange",
    "LogRange",
    "conditioned",
]

SCALES = ("sigmoid", "tanh", "none")


class LogRange:
    r"""A positive hyper-parameter range :math:`[low, high]` on a log scale, as a condition.

    :meth:`normalise` maps :math:`v` to :math:`2 (\log v - \log low)/(\log high - \log low) - 1`
    (:math:`[-1, 1]` inside the range); :meth:`sample` draws values log-uniformly.
    """

    def __init__(self, low: float, high: float) -> None:
        if not (0.0 < low < high) or not math.isfinite(high):
            raise ValueError(f"a log range needs 0 < low < high < inf, got [{low}, {high}]")
        self.low, self.high = float(low), float(high)
        self._log_low, self._log_span = math.log(low), math.log(high) - math.log(low)

    def normalise(self, value: Tensor | float) -> Tensor:
        """The condition of ``value`` (any shape, positive): ``2 u - 1``, ``u`` the position of
        :math:`\\log v` in the log range."""
        value = torch.as_tensor(value, dtype=torch.get_default_dtype())
        return 2.0 * (torch.log(value) - self._log_low) / self._log_span - 1.0

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """``n`` values drawn log-uniformly from the range, ``(n,)``."""
        u = torch.rand(n, generator=generator, device=device)
        return torch.exp(self._log_low + self._log_span * u)

    def __repr__(self) -> str:
        return f"LogRange({self.low:g}, {self.high:g})"


class LinearRange:
    r"""A hyper-parameter range :math:`[low, high]` on a linear scale, as a condition.

    :meth:`normalise` maps :math:`v` to :math:`2 (v - low)/(high - low) - 1` (:math:`[-1, 1]`
    inside the range); :meth:`sample` draws values uniformly. The linear twin of
    :class:`LogRange`, for parameters searched on a linear scale.
    """

    def __init__(self, low: float, high: float) -> None:
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"a linear range needs finite low < high, got [{low}, {high}]")
        self.low, self.high = float(low), float(high)
        self._span = self.high - self.low

    def normalise(self, value: Tensor | float) -> Tensor:
        """The condition of ``value`` (any shape): ``2 u - 1``, ``u`` its position in the range."""
        value = torch.as_tensor(value, dtype=torch.get_default_dtype())
        return 2.0 * (value - self.low) / self._span - 1.0

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """``n`` values drawn uniformly from the range, ``(n,)``."""
        u = torch.rand(n, generator=generator, device=device)
        return self.low + self._span * u

    def __repr__(self) -> str:
        return f"LinearRange({self.low:g}, {self.high:g})"


def _condition_batch(condition: Tensor, n: int, features: int) -> Tensor:
    """``condition`` as ``(n, features)``: one condition ``(features,)`` is repeated."""
    if condition.dim() == 1:
        condition = condition.unsqueeze(0)
    if condition.dim() != 2 or condition.shape[1] != features:
        raise ValueError(
            f"the condition must be ({features},) or (N, {features}), got {tuple(condition.shape)}"
        )
    if condition.shape[0] not in (1, n):
        raise ValueError(
            f"the condition has {condition.shape[0]} rows for a batch of {n} examples "
            "(one row per example, or one condition for all)"
        )
    return condition.expand(n, features)


class FiLM(nn.Module):
    r"""Per-channel scale and shift produced from a condition: :math:`\gamma(t) z + \beta(t)`.

    A small network :math:`g` (``Linear(k, hidden) -> SiLU -> Linear(hidden, 2C)``, or one
    ``Linear(k, 2C)`` with ``hidden=0``) maps the condition to :math:`(a, \beta)`, and

    - ``scale="sigmoid"``: :math:`\gamma = \epsilon + (1 - \epsilon)\,\sigma(a)`, in
      :math:`[\epsilon, 1]`;
    - ``scale="tanh"``: :math:`\gamma = \tanh(a)`, in :math:`[-1, 1]`;
    - ``scale="none"``: :math:`\gamma = 1` (shift only).

    :math:`\gamma` is clamped to :math:`[-1, 1]` after that, so rounding can never push it
    above 1. The output layer of :math:`g` starts at zero weights with the scale's bias at
    ``init_logit`` (:math:`\sigma(4) \approx 0.98`, :math:`\tanh(4) \approx 0.999`) and the
    shift's at 0: at initialisation the layer is nearly the identity for every condition.

    Args:
        channels: ``C``, the channels (features) of the activation it modulates.
        condition_features: ``k``, the size of one condition.
        hidden: width of the condition network's hidden layer (0: none).
        scale: ``"sigmoid"``, ``"tanh"`` or ``"none"``.
        eps: the lower bound of a sigmoid scale (keeps a channel from being switched off).
        init_logit: the initial pre-activation of the scale.

    Shape:
        ``z``: ``(N, C)`` or ``(N, C, H, W)`` (any ``(N, C, *)``); ``condition``: ``(k,)`` or
        ``(N, k)``; output: as ``z``.
    """

    def __init__(
        self,
        channels: int,
        condition_features: int,
        hidden: int = 32,
        *,
        scale: str = "sigmoid",
        eps: float = 1e-3,
        init_logit: float = 4.0,
    ) -> None:
        super().__init__()
        self.channels = positive_int("channels", channels)
        self.condition_features = positive_int("condition_features", condition_features)
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0, got {hidden}")
        self.scale, self.eps, self.hidden = scale, float(eps), int(hidden)
        out = nn.Linear(hidden or condition_features, 2 * channels)
        with torch.no_grad():
            out.weight.zero_()
            out.bias.zero_()
            if scale != "none":
                out.bias[:channels] = init_logit
        layers: list[nn.Module] = (
            [nn.Linear(condition_features, hidden), nn.SiLU(), out] if hidden else [out]
        )
        self.generator = nn.Sequential(*layers)

    def modulation(self, condition: Tensor, n: int | None = None) -> tuple[Tensor, Tensor]:
        r"""(:math:`\gamma`, :math:`\beta`) of ``condition``: each ``(N, C)`` for a condition
        ``(N, k)``, or ``(C,)`` for one condition ``(k,)`` when ``n`` is None."""
        single = condition.dim() == 1 and n is None
        batch = _condition_batch(condition, 1 if n is None else n, self.condition_features)
        raw = self.generator(batch)
        a, beta = raw[:, : self.channels], raw[:, self.channels :]
        if self.scale == "sigmoid":
            gamma = self.eps + (1.0 - self.eps) * torch.sigmoid(a)
        elif self.scale == "tanh":
            gamma = torch.tanh(a)
        else:
            gamma = torch.ones_like(a)
        gamma = gamma.clamp(-1.0, 1.0)
        if single:
            return gamma[0], beta[0]
        return gamma, beta

    def forward(self, z: Tensor, condition: Tensor) -> Tensor:
        if z.dim() < 2 or z.shape[1] != self.channels:
            raise ValueError(
                f"FiLM({self.channels}) expects (N, {self.channels}) or "
                f"(N, {self.channels}, H, W) activations, got {tuple(z.shape)}"
            )
        gamma, beta = self.modulation(condition.to(z.dtype), z.shape[0])
        view = (z.shape[0], self.channels) + (1,) * (z.dim() - 2)
        return gamma.reshape(view) * z + beta.reshape(view)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, condition_features={self.condition_features}, "
            f"hidden={self.hidden}, scale={self.scale!r}, eps={self.eps}"
        )


def _foldable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Conv2d)


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return int(cast(nn.Conv2d, module).out_channels)


class ConditionedSequential(LipschitzSequential):
    r"""A sequence of 1-Lipschitz modules and :class:`FiLM` layers; ``forward(x, condition)``.

    Each :class:`FiLM` must come right after an ``nn.Linear`` or ``nn.Conv2d`` (a constrained
    layer of :mod:`liptune.nn`) with as many outputs as it has channels, so that it folds into
    that layer at a fixed condition (:func:`liptune.export.vanilla_export_at`). For each fixed
    condition the map ``x -> self(x, condition)`` is then 1-Lipschitz (see the module
    docstring), with the certificate of ``certificate_mode`` (inferred from the last dense
    layer that is not inside a FiLM when ``None``).

    Shape:
        ``x`` as the first layer takes it; ``condition`` ``(k,)`` (one condition for the whole
        batch) or ``(N, k)`` (one per example).
    """

    def __init__(self, *modules: nn.Module, certificate_mode: str | None = None) -> None:
        if certificate_mode is None:
            certificate_mode = infer_certificate_mode(
                nn.Sequential(*[m for m in modules if not isinstance(m, FiLM)])
            )
        super().__init__(*modules, certificate_mode=certificate_mode)
        features = {m.condition_features for m in modules if isinstance(m, FiLM)}
        if len(features) > 1:
            raise ValueError(f"the FiLM layers disagree on the condition size: {features}")
        if not features:
            raise ValueError("a ConditionedSequential needs at least one FiLM layer")
        self.condition_features = features.pop()
        for index, module in enumerate(modules):
            if not isinstance(module, FiLM):
                continue
            before = modules[index - 1] if index else None
            if before is None or not _foldable(before):
                raise ValueError(
                    f"FiLM at position {index} must follow an nn.Linear or nn.Conv2d (it folds "
                    f"into that layer's weight and bias), follows {type(before).__name__}"
                )
            if _out_channels(before) != module.channels:
                raise ValueError(
                    f"FiLM at position {index} has {module.channels} channels, the layer "
                    f"before it {_out_channels(before)} outputs"
                )

    def forward(self, input: Tensor, condition: Tensor) -> Tensor:  # type: ignore[override]
        for module in self:
            input = module(input, condition) if isinstance(module, FiLM) else module(input)
        return input

    def at(self, condition: Tensor) -> FixedCondition:
        """This network at one fixed ``condition`` ``(k,)``, as a module of ``x`` alone (shares
        the parameters; for evaluation and attacks without exporting)."""
        return FixedCondition(self, condition)


class FixedCondition(nn.Module):
    """``x -> network(x, condition)`` for one condition ``(k,)``; carries the network's
    ``certificate_mode``."""

    def __init__(self, network: ConditionedSequential, condition: Tensor) -> None:
        super().__init__()
        condition = torch.as_tensor(condition).reshape(-1)
        if not condition.is_floating_point():
            condition = condition.to(torch.get_default_dtype())
        if condition.numel() != network.condition_features:
            raise ValueError(
                f"the condition must have {network.condition_features} values, got "
                f"{condition.numel()}"
            )
        self.network = network
        self.register_buffer("condition", condition)
        self.certificate_mode = network.certificate_mode

    def forward(self, input: Tensor) -> Tensor:
        return self.network(input, self.condition.to(input.dtype))


def conditioned(
    network: Iterable[nn.Module],
    condition_features: int,
    hidden: int = 32,
    *,
    head: bool = False,
    scale: str = "sigmoid",
    eps: float = 1e-3,
    certificate_mode: str | None = None,
) -> ConditionedSequential:
    """``network`` (an ``nn.Sequential``, e.g. a zoo MLP or conv net) with a :class:`FiLM`
    layer after each of its top-level ``nn.Linear``/``nn.Conv2d`` layers; ``head=True`` also
    after the last one (the logits). Layers nested in blocks (residual blocks) are left alone.
    The modules are shared with ``network``, not copied; its ``certificate_mode`` is kept.
    """
    modules = list(network.children() if isinstance(network, nn.Module) else network)
    mode = certificate_mode or getattr(network, "certificate_mode", None)
    if mode is not None and mode not in CERTIFICATE_MODES:
        raise ValueError(f"certificate_mode must be one of {CERTIFICATE_MODES}, got {mode!r}")
    foldable = [i for i, m in enumerate(modules) if _foldable(m)]
    if not foldable:
        raise ValueError("the network has no top-level nn.Linear or nn.Conv2d to condition")
    targets = set(foldable if head else foldable[:-1])
    if not targets:
        raise ValueError("the network's only layer is its head: pass head=True")
    layers: list[nn.Module] = []
    for index, module in enumerate(modules):
        layers.append(module)
        if index in targets:
            layers.append(
                FiLM(_out_channels(module), condition_features, hidden, scale=scale, eps=eps)
            )
    return ConditionedSequential(*layers, certificate_mode=mode)
