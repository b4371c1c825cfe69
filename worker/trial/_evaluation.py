"""Evaluation of a trained 1-Lipschitz classifier: accuracy, certificates, empirical attacks.

Everything runs batched, in eval mode (liptune's layers then cache their constrained weights),
under ``no_grad``; only the PGD attack needs input gradients.

Metrics (keys from :func:`worker.spec.metric_key`):

- ``accuracy``: clean accuracy;
- ``certified_accuracy_eps_{e}``: correctly classified with a certificate > e;
- ``mean_certified_radius``: mean certificate of the correctly classified points (0 if none);
- ``provable_avg_robustness``: the average certified radius over all points, a misclassified
  point counting 0 (the area under the certified-accuracy curve);
- ``mean_certifiable_robustness``: the mean signed margin as a radius (negative on errors);
- ``empirical_robust_accuracy_eps_{e}``: still correct after an L2 PGD attack of radius e.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from liptune import certify
from liptune.attacks import empirical_robust_accuracy
from liptune.certify import CertificateMode
from worker.spec import PGDSpec, metric_key
from worker.trial._certificates import RadiiSummary

EVAL_BATCH_SIZE = 2048


@dataclass(frozen=True)
class Predictions:
    """A model's outputs on a split: ``logits`` as the model returns them, ``correct`` (N,)
    bool and the certified L2 ``radii`` (N,), all on the CPU."""

    logits: Tensor
    correct: Tensor
    radii: Tensor

    def summary(self) -> RadiiSummary:
        return RadiiSummary.from_arrays(self.radii.numpy(), self.correct.numpy())


def predict(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    mode: CertificateMode,
    batch_size: int = EVAL_BATCH_SIZE,
    lipschitz: float = 1.0,
) -> Predictions:
    """Logits, correctness and certificates of ``model`` (on its device) for inputs ``x``
    (N, ...) and labels ``y`` (N,) int64; the certificates divide by ``lipschitz``, the
    guaranteed bound of what the head promises (1 during training, trusting the layers)."""
    logits, predicted, radii = certify.predict_with_certificates(
        model, x, batch_size=batch_size, mode=mode, lipschitz=lipschitz
    )
    return Predictions(logits.cpu(), (predicted.cpu() == y.cpu()), radii.cpu())


def accuracy_metrics(
    predictions: Predictions, eps: Sequence[float], prefix: str = ""
) -> dict[str, float]:
    """``{prefix}accuracy`` and ``{prefix}certified_accuracy_eps_{e}`` for each e."""
    correct, radii = predictions.correct, predictions.radii
    metrics = {f"{prefix}accuracy": correct.double().mean().item()}
    if eps:
        eps_tensor = torch.as_tensor(list(eps), dtype=radii.dtype)
        certified = (correct[:, None] & (radii[:, None] > eps_tensor[None, :])).double().mean(0)
        for value, fraction in zip(eps, certified.tolist(), strict=True):
            metrics[prefix + metric_key("certified_accuracy", value)] = fraction
    return metrics


def mean_certified_radius(predictions: Predictions) -> float:
    """The mean certificate of the correctly classified points (0 when there are none)."""
    correct, radii = predictions.correct, predictions.radii
    return radii[correct].double().mean().item() if correct.any() else 0.0


def robustness_metrics(
    predictions: Predictions, y: Tensor, mode: CertificateMode
) -> dict[str, float]:
    """``mean_certified_radius``, ``provable_avg_robustness`` and
    ``mean_certifiable_robustness`` (see the module docstring)."""
    logits = predictions.logits
    return {
        "mean_certified_radius": mean_certified_radius(predictions),
        "provable_avg_robustness": certify.provable_avg_robustness(logits, y, mode).item(),
        "mean_certifiable_robustness": certify.mean_certifiable_robustness(logits, y, mode).item(),
    }


def pgd_metrics(
    model: nn.Module, x: Tensor, y: Tensor, spec: PGDSpec, *, seed: int, device: torch.device
) -> dict[str, float]:
    """``empirical_robust_accuracy_eps_{e}`` on a seeded sample of ``spec.n_samples`` points."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randperm(len(y), generator=generator)[: spec.n_samples]
    values = empirical_robust_accuracy(
        model,
        x[sample].to(device),
        y[sample].to(device),
        list(spec.eps),
        steps=spec.steps,
    )
    return {
        metric_key("empirical_robust_accuracy", eps): float(value)
        for eps, value in zip(spec.eps, values.tolist(), strict=True)
    }
