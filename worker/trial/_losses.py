"""Loss families by name: a registry for the API and web forms, and ``build_loss``.

A :class:`~worker.spec.LossSpec` names a family and its hyper-parameters; the task of the data
set (``"binary"``: one output, ``"multiclass"``: C outputs) picks the liptune loss that
implements it. Parameters the spec leaves out take :data:`worker.spec.PARAM_DEFAULTS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import nn

from liptune import losses
from liptune.certify import MARGIN_DIVISORS
from worker.spec import FAMILY_PARAMS, PARAM_DEFAULTS, LossSpec

Task = Literal["binary", "multiclass"]


@dataclass(frozen=True)
class ParamInfo:
    """A loss hyper-parameter: its default and the range worth searching (``log``: on a log
    scale); ``limit`` says which values no training can use, and why (the API refuses them)."""

    description: str
    default: float
    low: float
    high: float
    log: bool
    limit: str = ""


_MARGIN_LIMIT = (
    "At most {bound} for inputs in [0, 1]^D (D values per input): a 1-Lipschitz network moves "
    "what the margin asks for (the {asked}) by at most {span} between two inputs, which are at "
    "most sqrt(D) apart, and the margin asks for it with opposite signs on two classes. A larger "
    "margin is met by no training; the API refuses it for image and array data sets."
)


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
        limit=_MARGIN_LIMIT.format(
            bound="sqrt(D/2) (global head), sqrt(D) (classwise head or binary)",
            asked="logit gap f_y - f_j >= margin, or y f(x) >= margin/2 binary",
            span="sqrt(2) sqrt(D) (global), 2 sqrt(D) (classwise), sqrt(D) (binary)",
        ),
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


#: Parameters whose meaning differs in a family: the offset cross-entropy's margin is the full
#: logit gap asked (no halving), and its temperature sharpens a smooth hinge at that margin.
FAMILY_PARAM_OVERRIDES: dict[str, dict[str, ParamInfo]] = {
    "offset_ce": {
        "margin": ParamInfo(
            "Offset subtracted from the true logit: the loss asks for a logit gap of margin "
            "(binary: y f(x) >= margin), which certifies margin/sqrt(2) (global head), margin/2 "
            "(classwise) or margin (binary); larger offsets buy certified radius at the cost of "
            "clean accuracy. Papers' `offset`.",
            PARAM_DEFAULTS["margin"],
            0.01,
            5.0,
            log=True,
            limit=_MARGIN_LIMIT.format(
                bound="sqrt(D/2) (global head), sqrt(D) (classwise), sqrt(D)/2 (binary)",
                asked="logit gap f_y - f_j >= margin, or y f(x) >= margin binary",
                span="sqrt(2) sqrt(D) (global), 2 sqrt(D) (classwise), sqrt(D) (binary)",
            ),
        ),
        "temperature": ParamInfo(
            "Inverse temperature tau: CE(tau (f - margin onehot(y)), y) / tau, the papers' "
            "divisor T = 1 / tau (orthogonium's LossXent temperature 0.25 is tau = 4); large "
            "values approach the hinge relu(margin - gap) (accuracy), small ones push gaps past "
            "the margin (robustness).",
            PARAM_DEFAULTS["temperature"],
            0.1,
            250.0,
            log=True,
        ),
    },
}


def _family(description: str, family: str, tasks: tuple[Task, ...]) -> LossInfo:
    overrides = FAMILY_PARAM_OVERRIDES.get(family, {})
    params = {name: overrides.get(name, PARAMS[name]) for name in FAMILY_PARAMS[family]}
    return LossInfo(description, params, tasks)


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
    "offset_ce": _family(
        "Offset cross-entropy, the recent literature's training loss: CE(tau (f - margin "
        "onehot(y)), y) / tau, a smooth hinge that asks for a logit gap of margin (binary: "
        "softplus(-tau (y f - margin)) / tau). Papers write T = 1 / tau.",
        "offset_ce",
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


def margin_limit(family: str, mode: str, input_size: int) -> float:
    """The largest ``margin`` of ``family`` a network with certificate ``mode`` can meet on
    inputs in [0, 1]^``input_size`` (see :class:`ParamInfo`'s ``limit``).

    The margin asks for a quantity q (a logit gap, or y f(x) binary) of at least a on inputs of
    two classes with opposite signs, so q must move by 2a between two inputs at most sqrt(D)
    apart; q is c-Lipschitz (c = sqrt(2) for the gap of a global head, 2 classwise, 1 for a
    binary f): a <= c sqrt(D) / 2. The HKR hinge asks a = margin/2 on a binary head and
    a = margin on a gap; the offset cross-entropy a = margin on both.
    """
    lipschitz = MARGIN_DIVISORS[mode]
    asked_per_margin = 0.5 if mode == "binary" and family != "offset_ce" else 1.0
    return lipschitz * math.sqrt(input_size) / 2.0 / asked_per_margin


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
        if binary:
            return losses.HKRLoss(alpha_kr=alpha_kr, margin=margin)
        return losses.MulticlassHKRLoss(alpha_kr=alpha_kr, margin=margin)
    if spec.family == "soft_hkr":
        return losses.MulticlassSoftHKRLoss(
            alpha_kr=alpha_kr, margin=margin, temperature=temperature
        )
    if spec.family == "tau_ce":
        if binary:
            return losses.TauBCEWithLogitsLoss(temperature=temperature)
        return losses.TauCrossEntropyLoss(temperature=temperature)
    if spec.family == "offset_ce":
        if binary:
            return losses.OffsetBCEWithLogitsLoss(margin=margin, temperature=temperature)
        return losses.OffsetCrossEntropyLoss(margin=margin, temperature=temperature)
    if spec.family == "hinge":
        if binary:
            return losses.HingeMarginLoss(margin=margin)
        return losses.MulticlassHingeLoss(margin=margin)
    if spec.family == "kr":
        return losses.KRLoss() if binary else losses.MulticlassKRLoss()
    return losses.CosineSimilarityLoss()
