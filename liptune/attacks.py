"""L2 attacks on the classification margin: PGD at a radius, a minimal-norm attack, and the
empirical check of certificates.

The attack lowers the margin of the true class,

* binary (one output): ``y f(x)`` with y in {-1, +1};
* multiclass: ``f_y(x) - max_{j != y} f_j(x)``,

by normalised gradient steps, projecting after each step onto the L2 ball of radius eps around
the clean input and onto the box [0, 1]. A point is misclassified once its margin is <= 0 (ties
count as errors). The model runs in eval mode with its parameters frozen; its train/eval mode and
``requires_grad`` flags are restored afterwards and no parameter gradient is accumulated.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypedDict

import torch
from torch import Tensor, nn

from liptune.losses import binary_signs, multiclass_mask

__all__ = [
    "CertificateCheck",
    "certificate_check",
    "empirical_robust_accuracy",
    "l2_pgd_attack",
    "minimal_l2_attack",
]


def _check_attack_inputs(x: Tensor, steps: int) -> None:
    """Raise a ``ValueError`` unless ``x`` is a non-empty batch in [0, 1] and ``steps >= 1``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a batch (N, ...) with N >= 1, got {tuple(x.shape)}")
    if bool((x < 0).any() | (x > 1).any()):
        raise ValueError("inputs x must be scaled to [0, 1] before the attack")


def margins(outputs: Tensor, target: Tensor) -> Tensor:
    """Signed margin of the true class, (N,): > 0 exactly where the prediction is right."""
    if outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1):
        f, signs = binary_signs(outputs, target)
        return signs * f
    mask = multiclass_mask(outputs, target)
    true_logit = (outputs * mask).sum(dim=1)
    return true_logit - outputs.masked_fill(mask, -math.inf).amax(dim=1)


@contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` on every parameter, both restored on exit."""
    was_training = model.training
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    model.eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, requires_grad in flags:
            parameter.requires_grad_(requires_grad)
        model.train(was_training)


def _per_sample(value: float | Tensor, name: str, n: int, like: Tensor) -> Tensor:
    """A radius (or step) as an (N, 1, ..., 1) tensor broadcastable against ``like``."""
    tensor = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if tensor.dim() == 0:
        tensor = tensor.expand(n)
    if tensor.shape != (n,):
        raise ValueError(f"{name} must be a number or a tensor of shape ({n},), got {tensor.shape}")
    if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0")
    return tensor.reshape(n, *([1] * (like.dim() - 1)))


def _l2_norms(delta: Tensor) -> Tensor:
    """Per-sample L2 norms of ``delta`` as (N, 1, ..., 1)."""
    return delta.flatten(1).norm(dim=1).reshape(-1, *([1] * (delta.dim() - 1)))


def _random_in_ball(x: Tensor, eps: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform samples in the L2 balls of radii ``eps``: a Gaussian direction, radius u^(1/d)."""
    direction = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    direction = direction / _l2_norms(direction).clamp_min(1e-12)
    dims = x[0].numel()
    u = torch.rand(eps.shape, generator=generator, dtype=x.dtype, device=x.device)
    return direction * eps * u.pow(1.0 / dims)


def l2_pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    steps: int = 20,
    step_size: float | Tensor | None = None,
    random_start: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Adversarial inputs within L2 distance ``eps`` of ``x`` that minimise the true margin.

    Returns, for each point, the iterate with the lowest margin seen (the starting point included),
    so a point found misclassified at any step stays so.

    Args:
        model: a classifier, binary (outputs (N,) or (N, 1)) or multiclass (outputs (N, C)).
        x: clean inputs (N, ...) in [0, 1].
        y: labels: {0, 1} or {-1, +1} for a binary model, class indices (N,) or one-hot (N, C).
        eps: the L2 radius, one for all points or one per point, shape (N,).
        steps: gradient steps, >= 1.
        step_size: L2 length of each step; default ``2.5 * eps / steps``.
        random_start: start from a uniform point of the ball instead of ``x``.
        generator: random generator of the random start.

    Returns:
        ``x_adv`` with the shape of ``x``, in [0, 1], ``||x_adv - x||_2 <= eps`` per point.
    """
    x_adv, _ = _attack(model, x, y, eps, steps, step_size, random_start, generator)
    return x_adv


def _attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    steps: int,
    step_size: float | Tensor | None,
    random_start: bool,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """:func:`l2_pgd_attack`, also returning the lowest margin found per point (N,)."""
    _check_attack_inputs(x, steps)
    n = x.shape[0]
    parameter = next(model.parameters(), None)
    device = x.device if parameter is None else parameter.device
    clean = x.detach().to(device)
    y = y.to(device)
    radius = _per_sample(eps, "eps", n, clean)
    step = _per_sample(
        2.5 * radius.reshape(n) / steps if step_size is None else step_size, "step_size", n, clean
    )

    with _frozen_eval(model), torch.enable_grad():
        x_adv = clean.clone()
        if random_start:
            x_adv = (clean + _random_in_ball(clean, radius, generator)).clamp(0.0, 1.0)
        best = clean.clone()
        best_margin = torch.full((n,), math.inf, dtype=clean.dtype, device=device)
        for iteration in range(steps + 1):
            x_adv.requires_grad_(True)
            margin = margins(model(x_adv), y)
            improved = margin.detach() < best_margin
            best = torch.where(improved.reshape(radius.shape), x_adv.detach(), best)
            best_margin = torch.where(improved, margin.detach(), best_margin)
            if iteration == steps:
                break
            (gradient,) = torch.autograd.grad(margin.sum(), x_adv)
            with torch.no_grad():
                x_adv = x_adv - step * gradient / _l2_norms(gradient).clamp_min(1e-12)
                delta = x_adv - clean
                delta = delta * (radius / _l2_norms(delta).clamp_min(1e-12)).clamp(max=1.0)
                x_adv = (clean + delta).clamp(0.0, 1.0)
    return best.to(x.device), best_margin.to(x.device)


def empirical_robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Sequence[float] | Tensor,
    steps: int = 20,
    step_size: float | None = None,
    random_start: bool = False,
    batch_size: int = 512,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fraction of points still correctly classified after :func:`l2_pgd_attack`, per eps.

    An upper bound of the true robust accuracy (the attack may miss adversarial points), to
    compare with the certified accuracy, a lower bound. eps = 0 gives the clean accuracy.

    Args:
        model, x, y, steps, step_size, random_start, generator: as in :func:`l2_pgd_attack`.
        eps: one radius or a sequence of radii (>= 0).
        batch_size: points attacked at once.

    Returns:
        A tensor with the shape of ``eps`` ((len(eps),) for a sequence, 0-dim for a float), on
        ``x``'s device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eps_values = torch.as_tensor(eps, dtype=torch.float64)
    if eps_values.dim() > 1:
        raise ValueError(f"eps must be a number or a 1-D sequence, got shape {eps_values.shape}")
    robust = torch.zeros(eps_values.numel(), dtype=torch.float64)
    for x_batch, y_batch in zip(x.split(batch_size), y.split(batch_size), strict=True):
        for index, radius in enumerate(eps_values.reshape(-1).tolist()):
            _, margin = _attack(
                model, x_batch, y_batch, radius, steps, step_size, random_start, generator
            )
            robust[index] += (margin > 0).sum().item()
    return (robust / x.shape[0]).to(dtype=x.dtype, device=x.device).reshape(eps_values.shape)


def minimal_l2_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int = 100,
    step_size: float = 1.0,
    gamma: float = 0.05,
    batch_size: int = 256,
) -> Tensor:
    r"""The L2 norm of the smallest adversarial perturbation found for each point, (N,).

    A decoupled direction-and-norm attack (after Rony et al., CVPR 2019): each step moves the
    perturbation along the normalised gradient that lowers the true margin (step length
    cosine-annealed from ``step_size`` to 1 % of it), then projects it onto the sphere of radius
    :math:`\epsilon`, which shrinks by the factor ``1 - gamma`` while the point is adversarial
    and grows by ``1 + gamma`` while it is not; the input stays in [0, 1]. The smallest
    perturbation seen that makes the margin <= 0 counts. 0 for a point misclassified already,
    ``inf`` where none was found. The model runs in float64 (a copy), so that a found
    perturbation is not an artefact of float32 rounding near the decision boundary.

    An upper bound of each point's true distance to the boundary: a certificate above it is
    a proof that the certificate is wrong.
    """
    _check_attack_inputs(x, steps)
    wide = copy.deepcopy(model).double()
    parameter = next(wide.parameters(), None)
    device = x.device if parameter is None else parameter.device
    found = [
        _ddn(wide, xb.to(device).double(), yb.to(device), steps, step_size, gamma)
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
    ]
    return torch.cat(found).to(x.device)


def _ddn(
    model: nn.Module, x: Tensor, y: Tensor, steps: int, step_size: float, gamma: float
) -> Tensor:
    n = x.shape[0]
    shape = (n, *([1] * (x.dim() - 1)))
    best = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
    eps = torch.ones(n, dtype=x.dtype, device=x.device)
    delta = torch.zeros_like(x)
    with _frozen_eval(model), torch.enable_grad():
        for step in range(steps + 1):
            delta.requires_grad_(True)
            margin = margins(model(x + delta), y)
            (gradient,) = torch.autograd.grad(margin.sum(), delta)
            with torch.no_grad():
                norm = delta.flatten(1).norm(dim=1)
                adversarial = margin <= 0
                best = torch.where(adversarial & (norm < best), norm, best)
                if step == steps:
                    break
                alpha = step_size * (0.01 + 0.99 * (1 + math.cos(math.pi * step / steps)) / 2)
                g_norm = gradient.flatten(1).norm(dim=1).clamp_min(1e-12)
                delta = delta - alpha * gradient / g_norm.reshape(shape)
                eps = torch.where(adversarial, eps * (1 - gamma), eps * (1 + gamma))
                eps = torch.minimum(eps, best.clamp_max(1e6))
                d_norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
                delta = delta * (eps / d_norm).reshape(shape)
                delta = (x + delta).clamp(0.0, 1.0) - x
    return best


class CertificateCheck(TypedDict):
    """What :func:`certificate_check` finds (see there)."""

    points: int
    violations: int
    tightness_median: float | None
    tightness_p10: float | None
    tightness_p90: float | None


def certificate_check(radii: Tensor, distances: Tensor) -> CertificateCheck:
    """Compare certificates with the adversarial distances found for the same points.

    Args:
        radii: the certified radii (N,) of correctly classified points.
        distances: :func:`minimal_l2_attack` distances (N,) of the same points.

    Returns:
        ``points`` (N), ``violations`` (points whose adversarial distance is below their
        certificate: a broken promise, must be 0), and the tightness radius / distance over
        the points where an adversarial was found: ``tightness_median``, ``tightness_p10``,
        ``tightness_p90`` (None when none was found).
    """
    if radii.shape != distances.shape or radii.dim() != 1:
        raise ValueError(
            f"radii and distances must both be (N,), got {tuple(radii.shape)} and "
            f"{tuple(distances.shape)}"
        )
    radii, distances = radii.double().cpu(), distances.double().cpu()
    violations = int((distances < radii).sum().item())
    found = torch.isfinite(distances) & (distances > 0)
    tightness = radii[found] / distances[found]

    def quantile(q: float) -> float | None:
        return float(tightness.quantile(q)) if tightness.numel() else None

    return {
        "points": int(radii.numel()),
        "violations": violations,
        "tightness_median": quantile(0.5),
        "tightness_p10": quantile(0.1),
        "tightness_p90": quantile(0.9),
    }
