"""Loss families by name: a registry for the API and web forms, and ``build_loss``.

A :class:`~worker.spec.LossSpec` names a family and its hyper-parameters; the task of the data
set (``"binary"``: one output, ``"multiclass"``: C outputs) picks the liptune loss that
implements it. Parameters the spec leaves out take :data:`worker.spec.PARAM_DEFAULTS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from liptune import losses
from worker.spec import FAMILY_PARAMS, PARAM_DEFAULTS, LossSpec

Task = Literal["binary", "multiclass"]


@dataclass(frozen=True)
class ParamInfo:
    """A loss hyper-parameter: its default and the range worth searching (``log``: on a log
    scale)."""

    description: str
    default: float
    low: float
    high: float
    log: bool


@dataclass(frozen=True)
class LossInfo:
    """A loss family: what it optimises, its parameters, and the tasks it has a variant for."""

    description: str
    params: dict[str, ParamInfo]
    tasks: tuple[Task, ...]


PARAMS: dict[str, ParamInfo] = {
    "margin": ParamInfo(
        "Hinge margin in input space: the hinge is relu(margin/2 - y f(x)); larger margins "
        "buy certified radius at the cost of clean accuracy.",
        PARAM_DEFAULTS["margin"],
        0.01,
        2.0,
        log=True,
    ),
    "alpha_kr": ParamInfo(
        "Weight of the hinge term against the KR term (inf: hinge only); small values favour "
        "robustness, large ones accuracy.",
        PARAM_DEFAULTS["alpha_kr"],
        1.0,
        1000.0,
        log=True,
    ),
    "temperature": ParamInfo(
        "Inverse temperature of the softmax: tau-CE is CE(tau f, y) / tau; small values push "
        "margins (robustness), large ones accuracy.",
        PARAM_DEFAULTS["temperature"],
        1.0,
        250.0,
        log=True,
    ),
}


def _family(description: str, family: str, tasks: tuple[Task, ...]) -> LossInfo:
    return LossInfo(description, {name: PARAMS[name] for name in FAMILY_PARAMS[family]}, tasks)


LOSSES: dict[str, LossInfo] = {
    "hkr": _family(
        "Hinge-Kantorovich-Rubinstein: a hinge with a margin plus the KR (Wasserstein) term that "
        "spreads the classes apart.",
        "hkr",
        ("binary", "multiclass"),
    ),
    "soft_hkr": _family(
        "HKR against a softmax-weighted mix of the other classes (temperature) instead of "
        "one-vs-all.",
        "soft_hkr",
        ("multiclass",),
    ),
    "tau_ce": _family(
        "Cross-entropy with a temperature: CE(tau f, y) / tau (binary: logistic loss).",
        "tau_ce",
        ("binary", "multiclass"),
    ),
    "hinge": _family("Hinge with a margin alone.", "hinge", ("binary", "multiclass")),
    "kr": _family(
        "Kantorovich-Rubinstein alone: maximises the gap between class scores (no margin).",
        "kr",
        ("binary", "multiclass"),
    ),
    "cosine": _family(
        "1 - cosine between the logits and the one-hot label: shapes the logits' direction.",
        "cosine",
        ("multiclass",),
    ),
}


def build_loss(spec: LossSpec, task: Task) -> nn.Module:
    """The liptune loss for ``spec`` on a ``task``; ``ValueError`` for a family that has no
    variant for the task (``soft_hkr`` and ``cosine`` are multiclass only)."""
    info = LOSSES[spec.family]
    if task not in info.tasks:
        raise ValueError(
            f"loss family {spec.family!r} has no {task} variant (it needs several outputs); "
            f"for a {task} task use one of "
            f"{[name for name, other in LOSSES.items() if task in other.tasks]}"
        )
    margin, alpha_kr, temperature = (spec.value(p) for p in ("margin", "alpha_kr", "temperature"))
    binary = task == "binary"
    if spec.family == "hkr":
        kind = losses.HKRLoss if binary else losses.MulticlassHKRLoss
        return kind(alpha_kr=alpha_kr, margin=margin)
    if spec.family == "soft_hkr":
        return losses.MulticlassSoftHKRLoss(
            alpha_kr=alpha_kr, margin=margin, temperature=temperature
        )
    if spec.family == "tau_ce":
        kind = losses.TauBCEWithLogitsLoss if binary else losses.TauCrossEntropyLoss
        return kind(temperature=temperature)
    if spec.family == "hinge":
        kind = losses.HingeMarginLoss if binary else losses.MulticlassHingeLoss
        return kind(margin=margin)
    if spec.family == "kr":
        return losses.KRLoss() if binary else losses.MulticlassKRLoss()
    return losses.CosineSimilarityLoss()
