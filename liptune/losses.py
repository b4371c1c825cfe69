"""Losses for 1-Lipschitz classifiers.

Every loss is a :class:`torch.nn.Module` called as ``loss(outputs, target)`` with a
``reduction`` of ``"mean"`` (default), ``"sum"`` or ``"none"`` (one value per sample, shape (N,)).

Shapes and targets:

* binary losses take ``outputs`` of shape (N,) or (N, 1) and ``target`` with N values in
  {0, 1} or in {-1, +1} (positive class: ``target > 0``);
* multiclass losses take ``outputs`` of shape (N, C), C >= 2, and ``target`` as class indices
  of shape (N,) (any integer dtype) or one-hot of shape (N, C).

Target *values* are checked when ``target`` is on the CPU. On an accelerator they are not read
back (that would synchronise the device with the host at every step): class indices out of
range trip ``one_hot``'s device-side assertion, and binary targets are taken by their sign.

Conventions of the field (DESIGN.md):

* ``alpha_kr`` is the guideline's weight of the hinge term against the KR term; the HKR losses
  compute the normalised combination ``a * hinge + (1 - a) * KR`` with ``a = alpha_kr / (1 +
  alpha_kr)``, so ``alpha_kr = 0`` is KR only and ``alpha_kr = float("inf")`` (a = 1) hinge only.
* The hinge is ``relu(margin / 2 - y f(x))`` with y in {-1, +1}.
* The KR losses are minimised: they return the *negative* Kantorovich-Rubinstein estimate of the
  Wasserstein-1 distance between the classes, ``-(E[f(x) | y = +1] - E[f(x) | y = -1])``.
* tau-cross-entropy is ``CE(temperature * logits, y) / temperature``: large temperatures favour
  accuracy, small ones robustness (the softmax keeps pushing a logit gap until ``temperature *
  gap`` is past about 1, so the margins it asks for scale as ``1 / temperature``).
* offset cross-entropy is ``CE(temperature * (logits - margin * onehot(y)), y) / temperature``
  (binary: ``softplus(-temperature * (y f(x) - margin)) / temperature``). Papers and orthogonium's
  ``LossXent(offset, temperature)`` write the temperature as a divisor T: ``T * CE((logits -
  offset * onehot(y)) / T, y)``, so ``margin = offset`` and ``temperature = 1 / T``.

Per-example hyper-parameters (loss-conditioned training, :mod:`liptune.nn.conditioning`): the
HKR, tau and offset losses take their hyper-parameters in ``forward`` too, as keywords
(``margin=``, ``alpha_kr=``, ``temperature=``), each a number or a tensor ``(N,)`` with one value
per example, replacing the module's value for that call. Example i's term is then the loss at
its own values; the batch's loss is the reduction of those terms as usual. For the HKR losses the
per-sample KR terms (whose batch mean is the KR estimate) are weighted by each example's
``1 - a_i``, so that with equal values the result is exactly the fixed loss. Values given as
tensors are checked (positive, finite; ``alpha_kr`` >= 0, ``inf`` allowed) on the CPU only, as
targets are.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CosineSimilarityLoss",
    "HKRLoss",
    "HingeMarginLoss",
    "KRLoss",
    "MulticlassHKRLoss",
    "MulticlassHingeLoss",
    "MulticlassKRLoss",
    "MulticlassSoftHKRLoss",
    "OffsetBCEWithLogitsLoss",
    "OffsetCrossEntropyLoss",
    "TauBCEWithLogitsLoss",
    "TauCrossEntropyLoss",
]

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------- validation


def _positive_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _hinge_weight(alpha_kr: float) -> float:
    """``alpha_kr / (1 + alpha_kr)``: the weight of the hinge term, 1 for ``alpha_kr = inf``."""
    alpha_kr = float(alpha_kr)
    if math.isnan(alpha_kr) or alpha_kr < 0.0:
        raise ValueError(f"alpha_kr must be >= 0 (float('inf') for hinge only), got {alpha_kr!r}")
    if math.isinf(alpha_kr):
        return 1.0
    return alpha_kr / (1.0 + alpha_kr)


def per_example(
    name: str, value: Tensor | float | None, default: float, outputs: Tensor
) -> Tensor | float:
    """A hyper-parameter given to ``forward``: ``default`` (the module's) when ``value`` is
    None, a checked float for a number, or a ``(N, 1)`` tensor of ``outputs``' dtype for one value
    per example (``(N,)`` or one value), checked when it lies on the CPU."""
    if value is None:
        return default
    if not isinstance(value, Tensor):
        if name == "alpha_kr":
            _hinge_weight(value)
            return float(value)
        return _positive_finite(name, value)
    n = outputs.shape[0]
    if value.dim() > 1 or value.numel() not in (1, n):
        raise ValueError(f"{name} must be a number or (N,) with N = {n}, got {tuple(value.shape)}")
    value = value.to(device=outputs.device, dtype=outputs.dtype).reshape(-1, 1)
    if value.device.type == "cpu":
        if name == "alpha_kr":
            if bool((torch.isnan(value) | (value < 0)).any()):
                raise ValueError("alpha_kr must be >= 0 (float('inf') for hinge only)")
        elif not bool((torch.isfinite(value) & (value > 0)).all()):
            raise ValueError(f"{name} must be finite and > 0 for every example")
    return value


def hinge_weights(alpha_kr: Tensor | float) -> Tensor | float:
    """``alpha_kr / (1 + alpha_kr)`` of a number or of a tensor (1 where ``alpha_kr = inf``)."""
    if not isinstance(alpha_kr, Tensor):
        return _hinge_weight(alpha_kr)
    return torch.where(torch.isinf(alpha_kr), torch.ones_like(alpha_kr), alpha_kr / (1 + alpha_kr))


def _column(value: Tensor | float) -> Tensor | float:
    """A per-example ``(N, 1)`` value as ``(N,)``; a number as is."""
    return value.reshape(-1) if isinstance(value, Tensor) else value


def binary_signs(outputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten binary ``outputs`` (N,) or (N, 1) and turn ``target`` into signs in {-1, +1}.

    Returns ``(f, y)``, both of shape (N,) and of the dtype of ``outputs``.
    """
    if outputs.dim() not in (1, 2) or (outputs.dim() == 2 and outputs.shape[1] != 1):
        raise ValueError(
            f"binary outputs must have shape (N,) or (N, 1), got {tuple(outputs.shape)}; "
            "use the multiclass losses for (N, C) outputs"
        )
    n = outputs.shape[0]
    if target.dim() not in (1, 2) or target.numel() != n or target.shape[0] != n:
        raise ValueError(
            f"outputs of shape {tuple(outputs.shape)} and binary target of shape "
            f"{tuple(target.shape)} do not match: expected a target of shape ({n},) or ({n}, 1)"
        )
    target = target.reshape(n)
    if target.dtype != torch.bool and target.device.type == "cpu":
        valid = (target == 1) | (target == 0) | (target == -1)
        mixed = (target == 0).any() & (target == -1).any()
        if bool(~valid.all() | mixed):
            raise ValueError(
                "binary target values must all be in {0, 1} or all in {-1, +1}, got "
                f"{sorted(torch.unique(target).tolist())[:10]}"
            )
    signs = torch.where(target > 0, 1.0, -1.0).to(dtype=outputs.dtype, device=outputs.device)
    return outputs.reshape(n), signs


def multiclass_mask(outputs: Tensor, target: Tensor) -> Tensor:
    """The boolean one-hot mask (N, C) of the true classes, from indices (N,) or one-hot (N, C)."""
    if outputs.dim() != 2 or outputs.shape[1] < 2:
        raise ValueError(
            f"multiclass outputs must have shape (N, C) with C >= 2, got {tuple(outputs.shape)}; "
            "use the binary losses for a single output"
        )
    n, classes = outputs.shape
    if target.dim() == 1:
        if target.shape[0] != n:
            raise ValueError(
                f"outputs of shape {tuple(outputs.shape)} and target class indices of shape "
                f"{tuple(target.shape)} do not match: expected indices of shape ({n},)"
            )
        if target.is_floating_point() or target.dtype == torch.bool:
            raise ValueError(
                f"target class indices must have an integer dtype (int64), got {target.dtype}; "
                "one-hot targets must have shape (N, C)"
            )
        if (
            n
            and target.device.type == "cpu"
            and bool((target < 0).any() | (target >= classes).any())
        ):
            raise ValueError(
                f"target class indices must lie in [0, {classes - 1}] for {classes} classes, "
                f"got values in [{int(target.min())}, {int(target.max())}]"
            )
        return F.one_hot(target.long().to(outputs.device), classes).bool()
    if target.shape != outputs.shape:
        raise ValueError(
            f"outputs of shape {tuple(outputs.shape)} and one-hot target of shape "
            f"{tuple(target.shape)} do not match: pass class indices of shape ({n},) or a "
            f"one-hot target of shape ({n}, {classes})"
        )
    mask = (target > 0).to(outputs.device)
    if target.device.type == "cpu" and bool((mask.sum(dim=1) != 1).any()):
        raise ValueError("one-hot target rows must each have exactly one positive entry")
    return mask


# --------------------------------------------------------------------------- per-sample terms


def _kr_terms(f: Tensor, positive: Tensor) -> Tensor:
    """Per-sample terms (N,) whose batch mean is the KR estimate, averaged over the K columns.

    For column k, sample i contributes ``N / n_pos_k * f_ik`` if positive and
    ``-N / n_neg_k * f_ik`` otherwise, so the batch mean is ``E[f_k | pos] - E[f_k | neg]``.
    """
    n = f.shape[0]
    n_pos = positive.sum(dim=0).clamp(min=1).to(f.dtype)
    n_neg = (~positive).sum(dim=0).clamp(min=1).to(f.dtype)
    weights = torch.where(positive, n / n_pos, -n / n_neg)
    return (weights * f).mean(dim=-1)


def _hinge_terms(
    f: Tensor, positive: Tensor, margin: Tensor | float, positive_weight: float
) -> Tensor:
    """Per-sample ``mean_k w_k relu(margin / 2 - y_k f_k)`` (N,), positives weighted by
    ``positive_weight``; ``margin`` a number or ``(N, 1)``, one per sample."""
    signs = torch.where(positive, 1.0, -1.0).to(f.dtype)
    hinge = F.relu(margin / 2.0 - signs * f)
    if positive_weight != 1.0:
        hinge = torch.where(positive, positive_weight * hinge, hinge)
    return hinge.mean(dim=-1)


def _hkr_weight(alpha_kr: Tensor | float | None, default: float, outputs: Tensor) -> Tensor | float:
    """The hinge weight ``a`` of a ``forward``'s ``alpha_kr`` (the module's when None): a number,
    or ``(N,)`` per example."""
    if alpha_kr is None:
        return default
    return _column(hinge_weights(per_example("alpha_kr", alpha_kr, 0.0, outputs)))


def _hkr(
    f: Tensor,
    positive: Tensor,
    margin: Tensor | float,
    weight: Tensor | float,
    positive_weight: float,
) -> Tensor:
    """Per-sample ``a * hinge - (1 - a) * KR`` terms (N,), ``a`` a number or one per sample."""
    loss = weight * _hinge_terms(f, positive, margin, positive_weight)
    if isinstance(weight, Tensor) or weight < 1.0:
        loss = loss - (1.0 - weight) * _kr_terms(f, positive)
    return loss


class _Loss(nn.Module):
    def __init__(self, reduction: Reduction = "mean") -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def _reduce(self, per_sample: Tensor) -> Tensor:
        if self.reduction == "mean":
            return per_sample.mean()
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample

    def extra_repr(self) -> str:
        names = ("alpha_kr", "margin", "temperature")
        fields = [f"{name}={getattr(self, name)}" for name in names if hasattr(self, name)]
        return ", ".join([*fields, f"reduction={self.reduction!r}"])


# --------------------------------------------------------------------------- binary


class _OffsetLoss(_Loss):
    """The offset cross-entropies' two settings: the offset ``margin`` and ``temperature``."""

    def __init__(
        self, margin: float = 1.0, temperature: float = 1.0, reduction: Reduction = "mean"
    ) -> None:
        super().__init__(reduction)
        self.margin = _positive_finite("margin", margin)
        self.temperature = _positive_finite("temperature", temperature)


class KRLoss(_Loss):
    r"""Negative Kantorovich-Rubinstein estimate of the Wasserstein-1 distance between classes:

    .. math:: \ell = -\left(\mathbb{E}[f(x) \mid y = +1] - \mathbb{E}[f(x) \mid y = -1]\right)

    The class means are taken over the batch; with ``reduction="none"`` the (N,) per-sample terms
    are ``-N / n_+ f(x_i)`` for positives and ``N / n_- f(x_i)`` for negatives (their mean is the
    loss).
    """

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        f, signs = binary_signs(outputs, target)
        return self._reduce(-_kr_terms(f[:, None], (signs > 0)[:, None]))


class HingeMarginLoss(_Loss):
    r"""Hinge loss ``relu(margin / 2 - y f(x))`` with y in {-1, +1}.

    Args:
        margin: the margin enforced between the classes (each side gets ``margin / 2``), > 0.
    """

    def __init__(self, margin: float = 1.0, reduction: Reduction = "mean") -> None:
        super().__init__(reduction)
        self.margin = _positive_finite("margin", margin)

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        f, signs = binary_signs(outputs, target)
        return self._reduce(F.relu(self.margin / 2.0 - signs * f))


class HKRLoss(_Loss):
    r"""Hinge-regularised KR loss: ``a * hinge + (1 - a) * KR`` with ``a = alpha_kr / (1 +
    alpha_kr)``.

    Args:
        alpha_kr: weight of the hinge term against the KR term (guideline convention), >= 0;
            ``float("inf")`` is hinge only, 0 is KR only.
        margin: margin of the hinge term (see :class:`HingeMarginLoss`), > 0.
    """

    def __init__(
        self, alpha_kr: float = 50.0, margin: float = 1.0, reduction: Reduction = "mean"
    ) -> None:
        super().__init__(reduction)
        self.hinge_weight = _hinge_weight(alpha_kr)
        self.alpha_kr = float(alpha_kr)
        self.margin = _positive_finite("margin", margin)

    def forward(
        self,
        outputs: Tensor,
        target: Tensor,
        *,
        margin: Tensor | float | None = None,
        alpha_kr: Tensor | float | None = None,
    ) -> Tensor:
        f, signs = binary_signs(outputs, target)
        positive = (signs > 0)[:, None]
        margin = per_example("margin", margin, self.margin, f)
        weight = _hkr_weight(alpha_kr, self.hinge_weight, f)
        return self._reduce(_hkr(f[:, None], positive, margin, weight, 1.0))


class TauBCEWithLogitsLoss(_Loss):
    r"""Binary cross-entropy with a temperature: ``BCEWithLogits(temperature * f(x), y) /
    temperature`` with y in {0, 1}.

    Args:
        temperature: tau > 0; large values approach the hinge ``relu(-y f(x))``.
    """

    def __init__(self, temperature: float = 1.0, reduction: Reduction = "mean") -> None:
        super().__init__(reduction)
        self.temperature = _positive_finite("temperature", temperature)

    def forward(
        self, outputs: Tensor, target: Tensor, *, temperature: Tensor | float | None = None
    ) -> Tensor:
        f, signs = binary_signs(outputs, target)
        tau = _column(per_example("temperature", temperature, self.temperature, f))
        loss = F.binary_cross_entropy_with_logits(
            tau * f, (signs > 0).to(f.dtype), reduction="none"
        )
        return self._reduce(loss / tau)


class OffsetBCEWithLogitsLoss(_OffsetLoss):
    r"""Binary offset cross-entropy, the binary twin of :class:`OffsetCrossEntropyLoss`:

    .. math:: \ell = \frac{1}{\tau}\,\mathrm{softplus}\left(-\tau\,(y f(x) - m)\right)

    with y in {-1, +1}: the logistic loss of the signed output shifted by the margin m. As
    :math:`\tau` grows it tends to the hinge ``relu(m - y f(x))`` (from above, by at most
    :math:`\log 2 / \tau`); small :math:`\tau` keep pushing ``y f(x)`` past m (robustness),
    large ones stop near m (accuracy). Unlike the HKR hinge, the full margin m is asked of
    ``y f(x)``, so m is the certified radius a point at the margin gets.

    Temperature convention: papers (and orthogonium's ``LossXent``) divide by a temperature T;
    ``temperature = 1 / T``.

    Args:
        margin: m > 0, the offset asked of ``y f(x)``.
        temperature: tau > 0, the inverse of the papers' T.
    """

    def forward(
        self,
        outputs: Tensor,
        target: Tensor,
        *,
        margin: Tensor | float | None = None,
        temperature: Tensor | float | None = None,
    ) -> Tensor:
        f, signs = binary_signs(outputs, target)
        m = _column(per_example("margin", margin, self.margin, f))
        tau = _column(per_example("temperature", temperature, self.temperature, f))
        loss = F.softplus(-tau * (signs * f - m))
        return self._reduce(loss / tau)


# --------------------------------------------------------------------------- multiclass


class MulticlassKRLoss(_Loss):
    r"""One-vs-all KR loss averaged over the C classes, negated to be minimised:

    .. math:: \ell = -\frac{1}{C}\sum_{c}\left(\mathbb{E}[f_c(x) \mid y = c]
        - \mathbb{E}[f_c(x) \mid y \neq c]\right)

    The class means are taken over the batch (a class absent from the batch contributes only its
    negative mean).
    """

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        return self._reduce(-_kr_terms(outputs, multiclass_mask(outputs, target)))


class MulticlassHingeLoss(_Loss):
    r"""One-vs-all hinge averaged over classes, the true class weighted by C - 1:

    .. math:: \ell = \frac{1}{C}\left((C - 1)\,\mathrm{relu}(m/2 - f_y)
        + \sum_{j \neq y} \mathrm{relu}(m/2 + f_j)\right)

    Args:
        margin: m > 0.
    """

    def __init__(self, margin: float = 1.0, reduction: Reduction = "mean") -> None:
        super().__init__(reduction)
        self.margin = _positive_finite("margin", margin)

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        positive = multiclass_mask(outputs, target)
        classes = outputs.shape[1]
        return self._reduce(_hinge_terms(outputs, positive, self.margin, classes - 1.0))


class MulticlassHKRLoss(_Loss):
    r"""``a * MulticlassHinge + (1 - a) * MulticlassKR`` with ``a = alpha_kr / (1 + alpha_kr)``.

    Args:
        alpha_kr: weight of the hinge term against the KR term, >= 0; ``float("inf")`` is hinge
            only, 0 is KR only.
        margin: margin of the hinge term, > 0.
    """

    def __init__(
        self, alpha_kr: float = 50.0, margin: float = 1.0, reduction: Reduction = "mean"
    ) -> None:
        super().__init__(reduction)
        self.hinge_weight = _hinge_weight(alpha_kr)
        self.alpha_kr = float(alpha_kr)
        self.margin = _positive_finite("margin", margin)

    def forward(
        self,
        outputs: Tensor,
        target: Tensor,
        *,
        margin: Tensor | float | None = None,
        alpha_kr: Tensor | float | None = None,
    ) -> Tensor:
        positive = multiclass_mask(outputs, target)
        classes = outputs.shape[1]
        margin = per_example("margin", margin, self.margin, outputs)
        weight = _hkr_weight(alpha_kr, self.hinge_weight, outputs)
        return self._reduce(_hkr(outputs, positive, margin, weight, classes - 1.0))


class MulticlassSoftHKRLoss(_Loss):
    r"""HKR between the true class and a softmax-weighted mix of the other classes.

    With :math:`w_j = \mathrm{softmax}_{j \neq y}(\tau f_j)` (the weights sum to 1 over the
    wrong classes, so the closest competitors dominate as :math:`\tau` grows):

    .. math::
        \mathrm{KR} &= -f_y + \sum_{j \neq y} w_j f_j \\
        \mathrm{hinge} &= \mathrm{relu}(m/2 - f_y) + \sum_{j \neq y} w_j\,\mathrm{relu}(m/2 + f_j)
        \\
        \ell &= a\,\mathrm{hinge} + (1 - a)\,\mathrm{KR}, \quad a = \alpha / (1 + \alpha)

    The temperature is fixed (no running statistics), so the loss of a batch depends on that
    batch only.

    Args:
        alpha_kr: weight of the hinge term against the KR term, >= 0; ``float("inf")`` is hinge
            only.
        margin: m > 0.
        temperature: tau > 0, applied to the logits inside the softmax.
    """

    def __init__(
        self,
        alpha_kr: float = 50.0,
        margin: float = 1.0,
        temperature: float = 1.0,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(reduction)
        self.hinge_weight = _hinge_weight(alpha_kr)
        self.alpha_kr = float(alpha_kr)
        self.margin = _positive_finite("margin", margin)
        self.temperature = _positive_finite("temperature", temperature)

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        positive = multiclass_mask(outputs, target)
        others = outputs.masked_fill(positive, float("-inf"))
        weights = torch.softmax(self.temperature * others, dim=-1)
        true_logit = (outputs * positive).sum(dim=-1)
        hinge = F.relu(self.margin / 2.0 - true_logit) + (
            weights * F.relu(self.margin / 2.0 + outputs)
        ).sum(dim=-1)
        loss = self.hinge_weight * hinge
        if self.hinge_weight < 1.0:
            kr = -true_logit + (weights * outputs).sum(dim=-1)
            loss = loss + (1.0 - self.hinge_weight) * kr
        return self._reduce(loss)


class TauCrossEntropyLoss(_Loss):
    r"""Cross-entropy with a temperature: ``CE(temperature * logits, y) / temperature``.

    The loss keeps pushing the gap between the true logit and the others until ``temperature *
    gap`` is past about 1, so the margins it asks for scale as ``1 / temperature``.

    Args:
        temperature: tau > 0; large values favour accuracy (the loss tends to the hinge
            ``relu(max_{j != y} f_j - f_y)``, which stops at a zero gap), small values
            robustness (larger margins, at some cost in accuracy).

    ``forward(outputs, target, temperature=None)``: a ``temperature`` given there, a positive
    tensor ``(N,)`` (one per example, e.g. a loss-conditioned network's training, each example
    at its own temperature) or a number, replaces the module's for that call.
    """

    def __init__(self, temperature: float = 1.0, reduction: Reduction = "mean") -> None:
        super().__init__(reduction)
        self.temperature = _positive_finite("temperature", temperature)

    def forward(
        self, outputs: Tensor, target: Tensor, temperature: Tensor | float | None = None
    ) -> Tensor:
        classes = multiclass_mask(outputs, target).int().argmax(dim=1)
        tau = per_example("temperature", temperature, self.temperature, outputs)
        loss = F.cross_entropy(tau * outputs, classes, reduction="none")
        return self._reduce(loss / _column(tau))


class OffsetCrossEntropyLoss(_OffsetLoss):
    r"""Offset cross-entropy: the tau-cross-entropy of the logits with the true one lowered by
    a margin m,

    .. math:: \ell = \frac{1}{\tau}\,\mathrm{CE}\left(\tau\,(f(x) - m\,e_y),\, y\right)

    (:math:`e_y` the one-hot vector of the true class). It asks for a gap of m between the true
    logit and the others, as a smooth hinge: as :math:`\tau` grows it tends to
    ``relu(m - (f_y - max_{j != y} f_j))``; small :math:`\tau` keep pushing the gap past m
    (robustness), large ones stop near m (accuracy). A gap m certifies a radius ``m / sqrt(2)``
    for a global head and ``m / 2`` for a classwise one. With two classes it is
    :class:`OffsetBCEWithLogitsLoss` of ``f_1 - f_0``.

    Temperature convention: papers and orthogonium's ``LossXent(n_classes, offset,
    temperature)`` compute ``T * CE((f(x) - offset * e_y) / T, y)`` with a divisor T; this is the
    same loss with ``margin = offset`` and ``temperature = 1 / T`` (orthogonium's default
    ``offset = 2.12132, temperature = 0.25`` is ``margin = 2.12132, temperature = 4``).

    Args:
        margin: m > 0, the logit gap asked of the true class.
        temperature: tau > 0, the inverse of the papers' T.
    """

    def forward(
        self,
        outputs: Tensor,
        target: Tensor,
        *,
        margin: Tensor | float | None = None,
        temperature: Tensor | float | None = None,
    ) -> Tensor:
        mask = multiclass_mask(outputs, target)
        m = per_example("margin", margin, self.margin, outputs)
        tau = per_example("temperature", temperature, self.temperature, outputs)
        shifted = outputs - m * mask.to(outputs.dtype)
        loss = F.cross_entropy(tau * shifted, mask.int().argmax(dim=1), reduction="none")
        return self._reduce(loss / _column(tau))


class CosineSimilarityLoss(_Loss):
    r"""``1 - cos(f(x), e_y)`` where :math:`e_y` is the one-hot vector of the true class, i.e.
    ``1 - f_y / ||f(x)||_2``; in [0, 2], scale invariant, so it only shapes the logits' direction.

    Multiclass only: a single output has no direction to learn beyond its sign.
    """

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        positive = multiclass_mask(outputs, target)
        cosine = F.cosine_similarity(outputs, positive.to(outputs.dtype), dim=1)
        return self._reduce(1.0 - cosine)
