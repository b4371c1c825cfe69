"""Certificates and robustness metrics of 1-Lipschitz classifiers.

For an L-Lipschitz map no L2 perturbation smaller than the certificate can change the prediction;
liptune's models are 1-Lipschitz, so the certificates come from one forward pass:

* ``"binary"`` (one output, predicted class ``f(x) > 0``): radius ``|f(x)|``;
* ``"global"`` (the whole logit map is 1-Lipschitz in L2): ``(f_top1 - f_top2) / sqrt(2)``,
  since moving the gap ``f_i - f_j`` by d needs ``||f(x') - f(x)||_2 >= d / sqrt(2)``;
* ``"classwise"`` (each logit is separately 1-Lipschitz): ``(f_top1 - f_top2) / 2``.

A point is *certified* at radius eps when it is correctly classified and its certificate is
``> eps``. Outputs are (N,) or (N, 1) in binary mode and (N, C) otherwise; targets follow
:mod:`liptune.losses` ({0, 1} or {-1, +1} in binary mode, class indices or one-hot otherwise).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal, cast

import torch
from torch import Tensor, nn

from liptune.losses import binary_signs, multiclass_mask
from liptune.nn.containers import CERTIFICATE_MODES

__all__ = [
    "CERTIFICATE_MODES",
    "MARGIN_DIVISORS",
    "CertificateMode",
    "certificate_mode",
    "certificates",
    "certified_robust_accuracy",
    "gradient_norm_ratio",
    "mean_certifiable_robustness",
    "predict_with_certificates",
    "provable_avg_robustness",
    "verified_predictions",
]

CertificateMode = Literal["binary", "global", "classwise"]
#: c of radius = margin / (c L), per certificate mode: the margin is |f| (binary) or the top-two
#: logit gap, which an L2 move of d changes by at most sqrt(2) d (global) or 2 d (classwise).
MARGIN_DIVISORS: dict[str, float] = {"binary": 1.0, "global": math.sqrt(2.0), "classwise": 2.0}
#: The factor that turns a logit gap into an L2 radius, per multiclass mode.
_GAP_SCALE = {mode: 1.0 / MARGIN_DIVISORS[mode] for mode in ("global", "classwise")}


def _check_mode(mode: object) -> CertificateMode:
    if mode not in CERTIFICATE_MODES:
        raise ValueError(f"certificate mode must be one of {CERTIFICATE_MODES}, got {mode!r}")
    return cast(CertificateMode, mode)


def _multiclass_outputs(outputs: Tensor, mode: str) -> Tensor:
    if outputs.dim() != 2 or outputs.shape[1] < 2:
        raise ValueError(
            f"{mode!r} certificates need outputs of shape (N, C) with C >= 2, got "
            f"{tuple(outputs.shape)}; use mode 'binary' for a single output"
        )
    return outputs


def certificates(outputs: Tensor, mode: CertificateMode, lipschitz: float = 1.0) -> Tensor:
    """The certified L2 radius of each prediction, shape (N,): margin / (c * ``lipschitz``).

    Args:
        outputs: logits of a 1-Lipschitz model, (N,) or (N, 1) for ``"binary"``, (N, C) else.
        mode: ``"binary"``, ``"global"`` or ``"classwise"`` (see the module docstring).
        lipschitz: a guaranteed upper bound of what the mode promises is 1-Lipschitz (the whole
            map, or each logit for ``"classwise"``), e.g. :func:`liptune.bounds.head_bound`;
            1 trusts the model's constraints.
    """
    mode = _check_mode(mode)
    if not (math.isfinite(lipschitz) and lipschitz > 0):
        raise ValueError(f"lipschitz must be a finite bound > 0, got {lipschitz!r}")
    if lipschitz != 1.0:
        return certificates(outputs, mode) / lipschitz
    if mode == "binary":
        if outputs.dim() not in (1, 2) or (outputs.dim() == 2 and outputs.shape[1] != 1):
            raise ValueError(
                f"'binary' certificates need outputs of shape (N,) or (N, 1), got "
                f"{tuple(outputs.shape)}; use mode 'global' or 'classwise' for (N, C) outputs"
            )
        return outputs.reshape(-1).abs()
    top2 = _multiclass_outputs(outputs, mode).topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) * _GAP_SCALE[mode]


def _correct(outputs: Tensor, target: Tensor, mode: str) -> Tensor:
    """Whether each prediction is right, (N,) bool."""
    if mode == "binary":
        f, signs = binary_signs(outputs, target)
        return (f > 0) == (signs > 0)
    mask = multiclass_mask(_multiclass_outputs(outputs, mode), target)
    return mask.gather(1, outputs.argmax(dim=1, keepdim=True)).squeeze(1)


def certified_robust_accuracy(
    outputs: Tensor,
    target: Tensor,
    eps: float | Sequence[float] | Tensor,
    mode: CertificateMode,
) -> Tensor:
    """Fraction of points correctly classified with a certificate ``> eps``, for every eps.

    All eps are evaluated in one pass over the certificates.

    Args:
        outputs: logits (see :func:`certificates`).
        target: labels of the N points.
        eps: one radius or a sequence of radii (>= 0).
        mode: the model's certificate mode.

    Returns:
        A float tensor with the shape of ``eps``: (len(eps),) for a sequence, 0-dim for a float.
    """
    eps_tensor = torch.as_tensor(eps, dtype=outputs.dtype, device=outputs.device)
    if eps_tensor.dim() > 1:
        raise ValueError(f"eps must be a number or a 1-D sequence, got shape {eps_tensor.shape}")
    if bool((eps_tensor < 0).any() | eps_tensor.isnan().any()):
        raise ValueError(f"eps must be >= 0, got {eps_tensor.tolist()}")
    radii = certificates(outputs, mode)
    correct = _correct(outputs, target, mode)
    if radii.numel() == 0:
        raise ValueError("outputs hold no point: certified accuracy of an empty set")
    certified_radii = torch.where(correct, radii, torch.full_like(radii, -math.inf))
    certified = certified_radii[:, None] > eps_tensor.reshape(1, -1)
    return certified.to(outputs.dtype).mean(dim=0).reshape(eps_tensor.shape)


def provable_avg_robustness(outputs: Tensor, target: Tensor, mode: CertificateMode) -> Tensor:
    r"""Average certified radius: :math:`\frac{1}{N}\sum_i r_i\,\mathbb{1}[\hat y_i = y_i]`.

    The certificate of a correctly classified point, 0 for a misclassified one, averaged over all
    N points (the "average certified radius" of the certified-robustness literature). It is the
    area under the certified-accuracy curve, :math:`\int_0^\infty \mathrm{CRA}(e)\,de`.
    Returns a 0-dim tensor.
    """
    radii = certificates(outputs, mode)
    correct = _correct(outputs, target, mode)
    return torch.where(correct, radii, torch.zeros_like(radii)).mean()


def mean_certifiable_robustness(outputs: Tensor, target: Tensor, mode: CertificateMode) -> Tensor:
    r"""Mean signed margin, turned into an L2 radius: negative on misclassified points.

    * binary: :math:`\mathbb{E}[y f(x)]` with y in {-1, +1};
    * multiclass: :math:`s\,\mathbb{E}[f_y(x) - \max_{j \neq y} f_j(x)]` with s = 1/sqrt(2)
      (``"global"``) or 1/2 (``"classwise"``).

    On a correctly classified point the term is its certificate; on a wrong one, minus the
    smallest perturbation that could make it right as far as the Lipschitz bound can tell.
    Returns a 0-dim tensor.
    """
    mode = _check_mode(mode)
    if mode == "binary":
        f, signs = binary_signs(outputs, target)
        return (signs * f).mean()
    mask = multiclass_mask(_multiclass_outputs(outputs, mode), target)
    true_logit = (outputs * mask).sum(dim=1)
    best_other = outputs.masked_fill(mask, -math.inf).amax(dim=1)
    return (true_logit - best_other).mean() * _GAP_SCALE[mode]


def certificate_mode(model: nn.Module) -> CertificateMode:
    """The certificate mode a model declares in its ``certificate_mode`` attribute."""
    mode = getattr(model, "certificate_mode", None)
    if mode is None:
        raise ValueError(
            f"{type(model).__name__} has no certificate_mode: build it with "
            "liptune.nn.LipschitzSequential, or set model.certificate_mode to one of "
            f"{CERTIFICATE_MODES} if you know that the model is 1-Lipschitz"
        )
    return _check_mode(mode)


def gradient_norm_ratio(
    model: nn.Module,
    x: Tensor,
    mode: CertificateMode | None = None,
    lipschitz: float = 1.0,
    batch_size: int = 256,
) -> Tensor:
    r"""How much of the Lipschitz bound the certified margin's slope uses at each input, (N,).

    With :math:`m(x)` the margin a certificate divides (:math:`|f(x)|`, or
    :math:`f_{top1} - f_{top2}` with the top two classes at :math:`x`), :math:`s` the mode's
    factor (1, :math:`1/\sqrt2`, :math:`1/2`) and :math:`L` = ``lipschitz``, returns
    :math:`s \|\nabla_x m(x)\|_2 / L`, in [0, 1] for a model the bound holds for. Where the
    model is locally linear the distance to the decision boundary is :math:`m / \|\nabla m\|`,
    so this is the first-order estimate of certificate tightness (certificate / distance): 1 for
    a gradient-norm-preserving network, small where layers shrink the gradient (channel-
    expanding convolutions, pooling that averages, rescaled kernels). Computed in float64 on a
    copy of the model in eval mode; ``x`` (N, ...) on the model's device or any.
    """
    mode = _check_mode(mode) if mode is not None else certificate_mode(model)
    if not (math.isfinite(lipschitz) and lipschitz > 0):
        raise ValueError(f"lipschitz must be a finite bound > 0, got {lipschitz!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wide = copy.deepcopy(model).double().eval()
    device = _model_device(wide, x.device)
    scale = 1.0 if mode == "binary" else _GAP_SCALE[mode]
    ratios = []
    for batch in x.split(batch_size):
        inputs = batch.to(device).double().requires_grad_(True)
        outputs = wide(inputs)
        if mode == "binary":
            margin = outputs.reshape(-1).abs()
        else:
            top2 = _multiclass_outputs(outputs, mode).topk(2, dim=1).values
            margin = top2[:, 0] - top2[:, 1]
        (gradient,) = torch.autograd.grad(margin.sum(), inputs)
        ratios.append(gradient.flatten(1).norm(dim=1) * (scale / lipschitz))
    return torch.cat(ratios).to(x.device)


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    parameter = next(model.parameters(), None)
    return fallback if parameter is None else parameter.device


def predict_with_certificates(
    model: nn.Module,
    x: Tensor,
    batch_size: int = 1024,
    mode: CertificateMode | None = None,
    lipschitz: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Logits, predicted classes and certificates of a model on ``x``, in eval mode, no grad.

    The model's train/eval mode is restored afterwards. Batches run on the model's device; the
    results are returned on ``x``'s device.

    Args:
        model: a 1-Lipschitz classifier.
        x: inputs (N, ...).
        batch_size: points per forward pass.
        mode: the certificate mode; default :func:`certificate_mode` of the model.
        lipschitz: the bound the certificates divide by (see :func:`certificates`).

    Returns:
        ``(logits, predictions, radii)``: logits as the model returns them ((N,), (N, 1) or
        (N, C)); predictions (N,) int64 (binary: 1 where f(x) > 0, else 0); radii (N,).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x must hold at least one input along dim 0, got {tuple(x.shape)}")
    mode = _check_mode(mode) if mode is not None else certificate_mode(model)
    device = _model_device(model, x.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = torch.cat(
                [model(batch.to(device)).to(x.device) for batch in x.split(batch_size)]
            )
    finally:
        model.train(was_training)
    if mode == "binary":
        predictions = (logits.reshape(-1) > 0).long()
    else:
        predictions = _multiclass_outputs(logits, mode).argmax(dim=1)
    return logits, predictions, certificates(logits, mode, lipschitz)


def verified_predictions(
    model: nn.Module,
    x: Tensor,
    input_shape: Sequence[int],
    batch_size: int = 1024,
    mode: CertificateMode | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`predict_with_certificates` with certificates from the model's verified bound.

    The radii are margin / (c · L) with L = :func:`liptune.bounds.head_bound` of ``model`` on
    inputs of ``input_shape`` (one example): sound whatever the constraints did, larger than
    the trusting ones when L < 1, smaller when L > 1.
    """
    from liptune.bounds import head_bound

    mode = _check_mode(mode) if mode is not None else certificate_mode(model)
    bound = head_bound(model, input_shape, mode)
    return predict_with_certificates(model, x, batch_size, mode, lipschitz=bound)
