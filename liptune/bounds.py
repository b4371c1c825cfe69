r"""Guaranteed upper bounds of the L2 Lipschitz constant, and power-iteration lower estimates.

Everything is computed in float64 on the CPU from :func:`liptune.export.vanilla_export` of the
model (wherever it was trained), so nothing the constraints claim is trusted. Per layer:

- ``nn.Linear``: its spectral norm by SVD.
- ``nn.Conv2d`` (any kernel, stride, dilation, groups, padding and padding mode): the minimum
  of two upper bounds.

  *Circulant bound.* Per spatial axis the layer is written as ``R C P``: ``P`` pads the input
  (zero padding: an isometric embedding; circular: an orthogonal roll; reflect/replicate: a
  0/1 matrix with norm :math:`\sqrt{\text{max copies of one pixel}}`), ``C`` is a circular
  convolution on a grid of ``M`` cells and ``R`` keeps the output rows (a crop, or for circular
  padding rows that may repeat, norm :math:`\sqrt{\text{max repeats}}`). A stride-s convolution
  is a stride-1 one of the space-to-depth (polyphase) input, an orthogonal rearrangement, with
  :math:`\lceil k/s \rceil` taps per side; so ``C`` is a stride-1 circular convolution with
  ``in * s_h * s_w`` channels, and its exact norm is the largest singular value of the kernel's
  2-D DFT over the ``M_h x M_w`` frequencies. For zero padding the grid is just large enough
  that no output wraps around (a zero-padded convolution is a crop of a circular one there).
  Exact for circular padding when the stride divides the map; an upper bound otherwise.

  *Dense bound.* Where the operator's matrix is small (see :data:`DENSE_LIMIT`), it is built
  column by column (the convolution of each unit input: its entries are the weights, exactly)
  and its norm taken from the eigenvalues of the smaller Gram matrix: exact up to rounding.
  This is what makes small zero-padded maps tight (the circulant bound there can be several
  percent above the truth).

  Each computed norm is raised by a margin that covers float64 rounding of the FFT, the Gram
  product and the eigen/SVD solvers (backward-stable, error at most a small multiple of
  ``n * eps`` times the Frobenius norm); the margin is ~1e-12 relatively, far below what
  matters to a certificate.
- ``nn.AvgPool2d`` (no ceil mode, padding counted): a depthwise convolution with a constant
  kernel, bounded as above.
- The core's activations and pooling (1-Lipschitz by construction, no weight): 1.
- :class:`~liptune.nn.SLLResidual` (an exported SLL layer): its SLL condition checked on the
  weights, :func:`sll_bound`.
- Composition: a sequence multiplies; ``LipschitzResidual`` gives :math:`t + (1 - t) L`;
  ``ScaledConcat`` gives :math:`\sqrt{\sum L_i^2 / n}`.

:func:`lipschitz_estimate` composes the same way with each layer's norm estimated by power
iteration (a lower estimate of each layer's exact norm, hence never above the bound): the gap
between the two says how much the bounding costs.

:func:`head_bound` is the constant each certificate divides by: the whole map for binary and
global heads; for a classwise head (each logit promised 1-Lipschitz on its own) the body's
bound times the largest row norm of the last ``nn.Linear``.

``input_shape`` is the shape of one example without the batch dimension.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from liptune._plain import vanilla_export
from liptune.layers import BoundRule, layer_type
from liptune.nn import (
    LipschitzResidual,
    ScaledConcat,
    SLLResidual,
    sll_gram_row_sums,
)

__all__ = [
    "DENSE_LIMIT",
    "LayerBound",
    "check_boundable",
    "conv_bound",
    "head_bound",
    "head_constants",
    "layer_bounds",
    "lipschitz_bound",
    "lipschitz_estimate",
    "sll_bound",
]

#: The dense bound runs when the smaller side of the operator's matrix has at most this many
#: rows (its Gram matrix is then at most this size squared) and the matrix has at most
#: ``DENSE_LIMIT * 8`` columns.
DENSE_LIMIT = 4096

_EPS = torch.finfo(torch.float64).eps
# Rounding margins are multiples of the solvers' backward-error constants; 16 is generous.
_SAFETY = 16.0


def _unsupported(module: nn.Module, name: str) -> TypeError:
    return TypeError(
        f"the Lipschitz bound cannot bound layer {name or '<model>'!r} of type "
        f"{type(module).__module__}.{type(module).__qualname__}; supported: nn.Sequential "
        f"containers, nn.Linear, nn.Conv2d, nn.AvgPool2d, LipschitzResidual, ScaledConcat, "
        f"SLL layers and the 1-Lipschitz activations and pooling of liptune.nn (as they are: "
        f"a subclass that overrides forward is not bounded)"
    )


def check_boundable(model: nn.Module, name: str = "") -> None:
    """Raise the ``TypeError`` :func:`lipschitz_bound` would raise for ``model`` (exported with
    :func:`~liptune.export.vanilla_export`), from its structure alone: no forward pass, so it
    runs on the ``meta`` device, where a network can be checked before it is trained."""
    entry = layer_type(model)
    if entry is None:
        raise _unsupported(model, name)
    if entry.bound is BoundRule.SEQUENTIAL:
        for child_name, child in model.named_children():
            check_boundable(child, _child(name, child_name))
    elif entry.bound is BoundRule.RESIDUAL:
        check_boundable(cast(LipschitzResidual, model).block, _child(name, "block"))
    elif entry.bound is BoundRule.CONCAT:
        for index, branch in enumerate(cast(ScaledConcat, model).branches):
            check_boundable(branch, _child(name, f"branches.{index}"))


@dataclass(frozen=True)
class LayerBound:
    """One weighted layer: its name in the model, type, input shape (one example), guaranteed
    ``bound``, power-iteration ``estimate`` (``estimate <= exact norm <= bound``) and the
    ``method`` that gave the bound (``"svd"``, ``"circulant"`` or ``"dense"``)."""

    name: str
    kind: str
    input_shape: tuple[int, ...]
    bound: float
    estimate: float
    method: str


def _matrix_norm_bound(matrix: Tensor) -> float:
    """Largest singular value of a float64 matrix (or batch), plus a rounding margin."""
    sigma = torch.linalg.matrix_norm(matrix, 2).max().item()
    frobenius = torch.linalg.matrix_norm(matrix).max().item()
    n = max(matrix.shape[-1], matrix.shape[-2])
    return sigma + _SAFETY * n * _EPS * frobenius


# ---------------------------------------------------------------------------- convolutions


def _pad_amounts(conv: nn.Conv2d, axis: int) -> tuple[int, int]:
    """(before, after) padding of ``conv`` along spatial ``axis`` (0: height, 1: width)."""
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":
        total = conv.dilation[axis] * (conv.kernel_size[axis] - 1)
        return total // 2, total - total // 2
    padding = cast(tuple[int, int], conv.padding)  # neither "valid" nor "same": numbers
    return padding[axis], padding[axis]


def _copies(length: int, before: int, after: int, mode: str) -> int:
    """The largest number of times one input cell appears in the padded axis."""
    index = torch.arange(-before, length + after)
    if mode == "reflect":
        period = 2 * (length - 1)
        index = index.remainder(period) if period else torch.zeros_like(index)
        index = torch.where(index >= length, period - index, index)
    else:
        index = index.clamp(0, length - 1)
    return int(torch.bincount(index, minlength=length).max().item())


@dataclass(frozen=True)
class _Axis:
    """How one spatial axis is embedded: phase stride, circulant grid, squared norm factor."""

    phase: int
    grid: int
    factor: int


def _axis_plan(conv: nn.Conv2d, axis: int, length: int) -> _Axis:
    k = conv.dilation[axis] * (conv.kernel_size[axis] - 1) + 1
    s = conv.stride[axis]
    before, after = _pad_amounts(conv, axis)
    padded = length + before + after
    out = (padded - k) // s + 1
    if conv.padding_mode == "circular":
        # Output i reads x[(s i + a - before) mod length]: after an orthogonal roll, rows of a
        # circular convolution on the torus, polyphase when the stride divides the length.
        phase = s if length % s == 0 else 1
        grid = length // phase
        rows = (torch.arange(out) * (s // phase)).remainder(grid)
        repeats = int(torch.bincount(rows, minlength=grid).max().item())
        return _Axis(phase, grid, repeats)
    copies = (
        1 if conv.padding_mode == "zeros" else _copies(length, before, after, conv.padding_mode)
    )
    taps = math.ceil(k / s)
    grid = max(math.ceil(padded / s), out + taps - 1)
    return _Axis(s, grid, copies)


def _full_kernel(conv: nn.Conv2d, weight: Tensor) -> Tensor:
    """The dense (out, in, k_eff_h, k_eff_w) kernel: groups block-diagonal, dilation spread."""
    out_channels, per_group, kh, kw = weight.shape
    dh, dw = conv.dilation
    groups = conv.groups
    kernel = weight.new_zeros(
        out_channels, per_group * groups, dh * (kh - 1) + 1, dw * (kw - 1) + 1
    )
    block = out_channels // groups
    for g in range(groups):
        kernel[g * block : (g + 1) * block, g * per_group : (g + 1) * per_group, ::dh, ::dw] = (
            weight[g * block : (g + 1) * block]
        )
    return kernel


def _circulant_bound(conv: nn.Conv2d, weight: Tensor, height: int, width: int) -> float:
    kernel = _full_kernel(conv, weight)
    plans = (_axis_plan(conv, 0, height), _axis_plan(conv, 1, width))
    (ph, pw), (mh, mw) = (plans[0].phase, plans[1].phase), (plans[0].grid, plans[1].grid)
    out_channels, in_channels, kh, kw = kernel.shape
    th, tw = math.ceil(kh / ph), math.ceil(kw / pw)
    padded = kernel.new_zeros(out_channels, in_channels, th * ph, tw * pw)
    padded[:, :, :kh, :kw] = kernel
    # (o, c, q_h, r_h, q_w, r_w) -> (o, c, r_h, r_w, q_h, q_w): tap a = s q + r.
    poly = padded.reshape(out_channels, in_channels, th, ph, tw, pw).permute(0, 1, 3, 5, 2, 4)
    poly = poly.reshape(out_channels, in_channels * ph * pw, th, tw)
    folded = poly.new_zeros(out_channels, in_channels * ph * pw, mh, mw)
    # A tap beyond the grid wraps around the torus (circular padding on tiny maps).
    for qh in range(th):
        for qw in range(tw):
            folded[:, :, qh % mh, qw % mw] += poly[:, :, qh, qw]
    symbol = torch.fft.fft2(folded).permute(2, 3, 0, 1).reshape(mh * mw, out_channels, -1)
    sigma = torch.linalg.matrix_norm(symbol, 2).max().item()
    margin = _SAFETY * _EPS * (math.log2(mh * mw) + sum(symbol.shape[1:]) + 2)
    sigma += margin * kernel.abs().sum().item()
    return math.sqrt(plans[0].factor * plans[1].factor) * sigma


def _dense_matrix(operator: Callable[[Tensor], Tensor], shape: tuple[int, ...]) -> Tensor:
    """The matrix of a linear ``operator`` on inputs of ``shape`` as (n_out, n_in), float64."""
    n_in = math.prod(shape)
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *shape)
    with torch.no_grad():
        columns = torch.cat([operator(chunk).reshape(len(chunk), -1) for chunk in basis.split(512)])
    return columns.mT


def _dense_bound(matrix: Tensor) -> float | None:
    r"""A guaranteed bound of :math:`\|A\|_2` from ``matrix``, or None if none was proven.

    With :math:`\hat G` the computed Gram matrix of the smaller side (error at most
    :math:`\gamma_n \|A\|_F^2` in norm), an estimate :math:`\theta` of its largest
    eigenvalue (``eigvalsh`` up to 1024 rows, LOBPCG above: it only decides tightness), and a
    candidate :math:`t = \theta (1 + r)`: if floating-point Cholesky of
    :math:`(t - \delta) I - \hat G` succeeds, with :math:`\delta` covering the Gram error and
    Cholesky's own (Rump, "Verification of positive definiteness", BIT 2006: a shift of
    :math:`\gamma_{n+1}` times the trace suffices), then :math:`\|A\|_2^2 \le t`. Cholesky
    costs a quarter of an eigen-decomposition, which matters on shared CPUs.
    """
    gram = matrix @ matrix.mT if matrix.shape[0] <= matrix.shape[1] else matrix.mT @ matrix
    n = gram.shape[0]
    if n <= 1024 or gram.abs().max().item() == 0:
        theta = torch.linalg.eigvalsh(gram)[-1].item()
    else:
        theta = torch.lobpcg(gram, k=1, largest=True, tol=1e-9, niter=300)[0].item()
    if theta <= 0:
        return 0.0 if gram.abs().max().item() == 0 else None
    gram_error = _SAFETY * n * _EPS * matrix.square().sum().item()
    eye = torch.eye(n, dtype=torch.float64)
    for relative in (1e-7, 1e-5, 1e-4, 1e-3, 1e-2):
        t = theta * (1.0 + relative)
        shifted = t * eye - gram
        delta = gram_error + _SAFETY * (n + 1) * _EPS * shifted.diagonal().abs().sum().item()
        _, info = torch.linalg.cholesky_ex(shifted - delta * eye)
        if info.item() == 0:
            return math.sqrt(t)
    return None


def _dense_fits(n_in: int, n_out: int) -> bool:
    return min(n_in, n_out) <= DENSE_LIMIT and max(n_in, n_out) <= 8 * DENSE_LIMIT


def conv_bound(
    conv: nn.Conv2d, input_shape: Sequence[int], *, dense: bool = True
) -> tuple[float, str]:
    """(guaranteed upper bound of ``conv``'s operator norm on inputs ``(C, H, W)``, method).

    The bias is ignored (it does not change the Lipschitz constant). ``dense=False`` skips the
    dense bound (tests use it to check the circulant bound alone).
    """
    weight = conv.weight.detach().double()
    channels, height, width = input_shape
    bound, method = _circulant_bound(conv, weight, height, width), "circulant"
    n_in = channels * height * width
    plain = _conv_operator(conv, weight)
    with torch.no_grad():
        n_out = plain(torch.zeros(1, channels, height, width, dtype=torch.float64)).numel()
    if dense and _dense_fits(n_in, n_out):
        exact = _dense_bound(_dense_matrix(plain, (channels, height, width)))
        if exact is not None and exact < bound:
            bound, method = exact, "dense"
    return bound, method


def _conv_operator(conv: nn.Conv2d, weight: Tensor) -> Callable[[Tensor], Tensor]:
    def operator(z: Tensor) -> Tensor:
        return conv._conv_forward(z, weight, None)

    return operator


def _avg_pool_as_conv(pool: nn.AvgPool2d, channels: int) -> nn.Conv2d:
    def pair(value: int | Sequence[int]) -> tuple[int, int]:
        return (value, value) if isinstance(value, int) else (value[0], value[1])

    kernel, stride, padding = pair(pool.kernel_size), pair(pool.stride), pair(pool.padding)
    if pool.ceil_mode or (not pool.count_include_pad and padding != (0, 0)):
        raise TypeError(
            "the bound handles nn.AvgPool2d without ceil_mode and with count_include_pad "
            f"(or no padding); got {pool}"
        )
    divisor = pool.divisor_override or kernel[0] * kernel[1]
    conv = nn.Conv2d(
        channels, channels, kernel, stride=stride, padding=padding, groups=channels, bias=False
    ).double()
    with torch.no_grad():
        conv.weight.fill_(1.0 / divisor)
    return conv


# --------------------------------------------------------------------------- SLL layers


def sll_bound(module: SLLResidual, input_shape: Sequence[int]) -> float:
    r"""A guaranteed Lipschitz bound of ``x - B^T ReLU(A x + b)`` (:class:`SLLResidual`) from
    its weights, on inputs of ``input_shape``.

    Writes the transposed kernel as :math:`B_j = s_j K_j + E_j` per inner channel, with
    :math:`s_j = \max(\langle B_j, K_j\rangle / \|K_j\|^2, 0)` and :math:`t_j = 2 / s_j`.
    With :math:`r_j` the witness-weighted Gram row sums (:func:`~liptune.nn.sll_gram_row_sums`
    with the module's ``q``), :math:`\operatorname{diag}(r) \succeq A A^\top`, so
    :math:`(1 + \varepsilon) T \succeq A A^\top` for :math:`\varepsilon = \max_j (r_j / t_j
    - 1)^+`, and the Jacobian of the exact part has eigenvalues in
    :math:`[-1 - 2\varepsilon, 1]`. The remainder adds at most :math:`\|E\| \|A\|`
    (:math:`\|E\| \le \sum_u \|E[:, :, u]\|_F`, :math:`\|A\|` the convolution's bound).
    So the bound is :math:`1 + 2\varepsilon + \|E\|\|A\|` plus a rounding margin: 1 up to
    rounding for an exported :class:`~liptune.nn.SLLConv2d`, and still sound (no better than
    :math:`1 + \|B\|\|A\|`) for weights that do not have the SLL structure.
    """
    conv, adjoint = module.conv, module.transposed
    kernel = conv.weight.detach().double()
    transposed = adjoint.weight.detach().double()
    plain = (1, 1), (1, 1), 1
    if (
        transposed.shape != kernel.shape
        or adjoint.bias is not None
        or (conv.stride, conv.dilation, conv.groups) != plain
        or (adjoint.stride, adjoint.dilation, adjoint.groups) != plain
        or conv.padding_mode != "zeros"
        or tuple(adjoint.padding) != tuple(conv.padding)
        or tuple(adjoint.output_padding) != (0, 0)
    ):
        raise TypeError(
            "SLLResidual needs a stride-1 zero-padded convolution and, as its adjoint, a "
            "transposed convolution with the kernel's shape, the same padding and no bias; got "
            f"{conv} and {adjoint}"
        )
    q = module.q.detach().double()
    if not bool((q > 0).all()):
        raise ValueError("SLLResidual.q must be positive (it weights the Gram row sums)")
    squared = kernel.flatten(1).square().sum(dim=1)
    along = (transposed * kernel).flatten(1).sum(dim=1)
    s = torch.where(squared > 0, along / squared.clamp(min=_EPS), 0.0).clamp(min=0.0)
    remainder = transposed - s[:, None, None, None] * kernel
    row_sums = sll_gram_row_sums(kernel, q)
    excess = max((row_sums * s / 2).max().item() - 1.0, 0.0)
    remainder_norm = torch.linalg.matrix_norm(remainder.permute(2, 3, 0, 1)).sum().item()
    conv_norm = conv_bound(copy.deepcopy(conv).double(), tuple(input_shape))[0]
    n = kernel.numel()
    return 1.0 + 2.0 * excess + remainder_norm * conv_norm + _SAFETY * n * _EPS


# --------------------------------------------------------------------------- estimates


def _power_norm(operator: Callable[[Tensor], Tensor], example: Tensor, iterations: int) -> float:
    """Power iteration on :math:`A^\\top A` (adjoint by autograd): a lower estimate of
    :math:`\\|A\\|_2`, since every iterate's ratio ``||A x|| / ||x||`` is at most the norm."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(example.shape, generator=generator, dtype=torch.float64, device="cpu")
    x = x.to(example.device)
    x = x / x.norm()
    best = 0.0
    for _ in range(iterations):
        x.requires_grad_(True)
        with torch.enable_grad():
            y = operator(x)
            (gradient,) = torch.autograd.grad(y, x, grad_outputs=y)
        value = y.detach().norm().item()
        best = max(best, value)
        norm = gradient.norm()
        if norm == 0:
            break
        x = (gradient / norm).detach()
    return best


# ------------------------------------------------------------------------- composition


def _child(name: str, child: str) -> str:
    return f"{name}.{child}" if name else child


class _Walker:
    """Composes per-layer constants through the model, recording the weighted layers."""

    def __init__(self, iterations: int) -> None:
        self.iterations = iterations
        self.layers: list[LayerBound] = []

    def layer(self, name: str, module: nn.Module, x: Tensor) -> tuple[float, float]:
        shape = tuple(x.shape[1:])
        if isinstance(module, nn.Linear):
            weight = module.weight.detach().double()
            bound, method = _matrix_norm_bound(weight), "svd"
            estimate = torch.linalg.matrix_norm(weight, 2).item()
        else:
            conv = (
                module
                if isinstance(module, nn.Conv2d)
                else _avg_pool_as_conv(cast(nn.AvgPool2d, module), shape[0])
            )
            bound, method = conv_bound(conv, shape)
            operator = _conv_operator(conv, conv.weight.detach().double())
            estimate = min(_power_norm(operator, x, self.iterations), bound)
        self.layers.append(LayerBound(name, type(module).__name__, shape, bound, estimate, method))
        return bound, estimate

    def sll(self, name: str, module: SLLResidual, x: Tensor) -> tuple[float, float]:
        bound = sll_bound(module, tuple(x.shape[1:]))
        with torch.no_grad():
            active = (module.conv(x) > 0).to(x.dtype)
        conv, transposed = module.conv, module.transposed

        def jacobian(v: Tensor) -> Tensor:  # of the map at x: I - B D A
            inner = conv._conv_forward(v, conv.weight, None) * active
            padding = cast(tuple[int, int], transposed.padding)
            return v - F.conv_transpose2d(inner, transposed.weight, padding=padding)

        estimate = min(_power_norm(jacobian, x, self.iterations), bound)
        shape = tuple(x.shape[1:])
        self.layers.append(LayerBound(name, type(module).__name__, shape, bound, estimate, "sll"))
        return bound, estimate

    def walk(self, module: nn.Module, x: Tensor, name: str) -> tuple[float, float, Tensor]:
        """(bound, estimate, module(x)) of ``module`` on inputs shaped like ``x``."""
        entry = layer_type(module)
        if entry is None:
            raise _unsupported(module, name)
        if entry.bound is BoundRule.SEQUENTIAL:
            bound = estimate = 1.0
            for child_name, child in module.named_children():
                b, e, x = self.walk(child, x, _child(name, child_name))
                bound, estimate = bound * b, estimate * e
            return bound, estimate, x
        with torch.no_grad():
            y = module(x)
        if entry.bound is BoundRule.RESIDUAL:
            residual = cast(LipschitzResidual, module)
            b, e, _ = self.walk(residual.block, x, _child(name, "block"))
            t = residual.skip_weight
            return t + (1 - t) * b, t + (1 - t) * e, y
        if entry.bound is BoundRule.CONCAT:
            parts = [
                self.walk(branch, x, _child(name, f"branches.{i}"))[:2]
                for i, branch in enumerate(cast(ScaledConcat, module).branches)
            ]
            n = len(parts)
            bound = math.sqrt(sum(b * b for b, _ in parts) / n)
            return bound, math.sqrt(sum(e * e for _, e in parts) / n), y
        if entry.bound is BoundRule.SLL:
            b, e = self.sll(name, cast(SLLResidual, module), x)
            return b, e, y
        if entry.bound is BoundRule.WEIGHTED:
            b, e = self.layer(name, module, x)
            return b, e, y
        return 1.0, 1.0, y


def _example(input_shape: Sequence[int]) -> Tensor:
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(
            f"input_shape must be the shape of one example (no batch dimension) as positive "
            f"ints, e.g. (1, 28, 28); got {input_shape!r}"
        )
    return torch.rand((1, *shape), dtype=torch.float64, device="cpu")


def _walk(
    model: nn.Module, input_shape: Sequence[int], iterations: int
) -> tuple[float, float, list[LayerBound]]:
    example = _example(input_shape)
    exported = vanilla_export(model).double().cpu()
    walker = _Walker(iterations)
    bound, estimate, _ = walker.walk(exported, example, "")
    return bound, estimate, walker.layers


def layer_bounds(
    model: nn.Module, input_shape: Sequence[int], *, iterations: int = 200
) -> list[LayerBound]:
    """Bound and estimate of every weighted layer of ``model``, in forward order."""
    return _walk(model, input_shape, iterations)[2]


def lipschitz_bound(model: nn.Module, input_shape: Sequence[int]) -> float:
    """A guaranteed upper bound of the L2 Lipschitz constant of ``model`` (module docstring).

    A layer it cannot bound raises a ``TypeError`` naming it.
    """
    return _walk(model, input_shape, 1)[0]


def lipschitz_estimate(
    model: nn.Module, input_shape: Sequence[int], *, iterations: int = 200
) -> float:
    """The same composition with each layer's norm estimated from below by power iteration.

    Not a bound of anything: each layer's value is at most its exact norm, so this is at most
    :func:`lipschitz_bound`; the gap says how tight the bound is layer by layer.
    """
    return _walk(model, input_shape, iterations)[1]


def head_bound(model: nn.Module, input_shape: Sequence[int], mode: str | None = None) -> float:
    """The Lipschitz constant the certificates of ``model`` divide by, guaranteed.

    ``mode`` defaults to ``model.certificate_mode``. ``"binary"``/``"global"``: the whole map's
    :func:`lipschitz_bound`. ``"classwise"`` (each logit on its own): the model must end with an
    ``nn.Linear`` (in a sequence); the bound of what comes before it times the largest L2 norm
    of the Linear's rows, i.e. a bound of every single logit's constant.
    """
    return head_constants(model, input_shape, mode, iterations=1)[0]


def head_constants(
    model: nn.Module, input_shape: Sequence[int], mode: str | None = None, iterations: int = 200
) -> tuple[float, float]:
    """(:func:`head_bound`, the matching power-iteration estimate) in one pass."""
    mode = mode if mode is not None else getattr(model, "certificate_mode", None)
    if mode not in ("binary", "global", "classwise"):
        raise ValueError(
            f"certificate mode must be 'binary', 'global' or 'classwise', got {mode!r}"
        )
    if mode != "classwise":
        bound, estimate, _ = _walk(model, input_shape, iterations)
        return bound, estimate
    example = _example(input_shape)
    exported = vanilla_export(model).double().cpu()
    children = list(exported.children()) if isinstance(exported, nn.Sequential) else []
    if not children or not isinstance(children[-1], nn.Linear):
        raise TypeError(
            "a classwise head needs a model that is an nn.Sequential ending with an nn.Linear "
            f"(the head whose rows are the logits); got {type(model).__name__}"
        )
    head = children[-1].weight.detach()
    rows = torch.linalg.vector_norm(head, dim=1).max().item()
    body_bound, body_estimate, _ = _Walker(iterations).walk(
        nn.Sequential(*children[:-1]), example, ""
    )
    return body_bound * rows * (1.0 + _SAFETY * head.shape[1] * _EPS), body_estimate * rows
