"""What a study's trials mean: records, Pareto fronts, the knee, hypervolume, recommendations.

Pure functions over typed records. :func:`trial_record` turns one Optuna trial into the one
frozen view of it (:class:`service.schemas.TrialRecord`) that the API returns and the pages
draw; every other function works on lists of those records and on objective descriptions ``{"key",
"metric", "eps", "direction"}`` (the ``"objectives"`` of ``GET /studies/{id}``, see
:func:`objective_entries`).

Conventions:

- Only ``COMPLETE`` trials whose ``feasible`` is not ``False`` take part in fronts, best values,
  hypervolume and recommendations.
- A front "at eps" is the front in (clean accuracy, certified accuracy at eps), recomputed from the
  radii each trial stored (:class:`worker.trial._certificates.RadiiSummary`), so no retraining is
  needed.
- Values are compared as Optuna does: one direction per objective, ``maximize`` or ``minimize``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import moocore
import numpy as np
from optuna.trial import FrozenTrial, TrialState

from service.schemas import TRIAL_STATES, TrialRecord
from worker.search import as_losses, non_dominated, trial_params
from worker.spec import DEFAULT_REPORT_EPS, FAMILY_PARAMS, StudySpec, metric_key
from worker.study import TrialAttributes
from worker.trial import RadiiSummary

#: Objectives whose worst value is 0 (fractions and radii); used as the hypervolume reference.
_ZERO_WORST_METRICS = (
    "accuracy",
    "certified_accuracy",
    "empirical_robust_accuracy",
    "mean_certified_radius",
)

ObjectiveEntry = Mapping[str, Any]


# --------------------------------------------------------------------------- records


def objective_entries(spec: StudySpec) -> list[dict[str, Any]]:
    """The study's objectives as ``[{"key", "metric", "eps", "direction"}]``, in Optuna's order."""
    return [
        {
            "key": objective.key,
            "metric": objective.metric,
            "eps": objective.eps,
            "direction": objective.direction,
        }
        for objective in spec.objectives
    ]


def eps_objectives(eps: float) -> list[dict[str, Any]]:
    """The two objectives of a front at ``eps``: clean accuracy and certified accuracy at eps."""
    return [
        {"key": "accuracy", "metric": "accuracy", "eps": None, "direction": "maximize"},
        {
            "key": metric_key("certified_accuracy", eps),
            "metric": "certified_accuracy",
            "eps": eps,
            "direction": "maximize",
        },
    ]


def trial_record(frozen_trial: FrozenTrial, spec: StudySpec) -> TrialRecord:
    """The JSON-ready record of one trial.

    Keys: ``number``, ``state`` (one of :data:`TRIAL_STATES`), ``params`` (``loss`` and the
    family's ``margin``/``alpha_kr``/``temperature``; ``alpha_kr`` may be ``inf``), ``values``
    (objective key -> value, ``None`` unless the trial completed), ``metrics`` (every final
    metric), ``feasible`` (``None`` unless completed), ``failure_reason``, ``mlflow_run_id``,
    ``model_uri``, ``started_at``/``completed_at`` (ISO 8601), ``duration_s``, ``retry_of``,
    ``epochs_trained``, ``pruned_at_epoch`` (the epoch after which the pruner stopped it) and
    ``values_reached`` (a pruned trial's validation metrics at that epoch, by metric key, with
    ``training_time`` so far; ``None`` for other trials), ``attack`` (the attack check of its
    certificates: ``points``, ``violations``, ``tightness_median``/``_p10``/``_p90``; ``None``
    when none ran) and ``certificate_violations`` (the attack's ``violations``: > 0 means a
    certificate was broken).
    """
    stored = TrialAttributes.read(
        frozen_trial,
        "metrics",
        "failure_reason",
        "mlflow_run_id",
        "model_uri",
        "retry_of",
        "epochs",
        "pruned_at_epoch",
        "attack",
    )
    state = frozen_trial.state.name
    # A study of one family never suggests ``loss``: the worker records it with the values.
    family = frozen_trial.params.get("loss") or trial_params(frozen_trial).get("loss")
    params: dict[str, Any] = {"loss": family}
    for name in FAMILY_PARAMS.get(family, ()):
        if name in frozen_trial.params:
            params[name] = float(frozen_trial.params[name])
    metrics = stored.metrics
    completed = frozen_trial.state == TrialState.COMPLETE and frozen_trial.values is not None
    values = (
        {
            objective.key: float(value)
            for objective, value in zip(spec.objectives, frozen_trial.values, strict=True)
        }
        if completed
        else None
    )
    duration = frozen_trial.duration
    return TrialRecord(
        **{
            "number": frozen_trial.number,
            "state": state,
            "params": params,
            "values": values,
            "metrics": metrics,
            "feasible": _feasible(frozen_trial, spec, metrics) if completed else None,
            "failure_reason": stored.failure_reason,
            "mlflow_run_id": stored.mlflow_run_id,
            "model_uri": stored.model_uri,
            "started_at": _isoformat(frozen_trial.datetime_start),
            "completed_at": _isoformat(frozen_trial.datetime_complete),
            "duration_s": duration.total_seconds() if duration is not None else None,
            "retry_of": stored.retry_of,
            "epochs_trained": len(stored.epochs),
            "pruned_at_epoch": stored.pruned_at_epoch,
            "values_reached": _values_reached(stored.epochs) if state == "PRUNED" else None,
            "attack": stored.attack.summary() if stored.attack is not None else None,
            "certificate_violations": stored.attack.violations
            if stored.attack is not None
            else None,
        }
    )


def _values_reached(epochs: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    if not epochs:
        return None
    last = epochs[-1]
    reached = {k[len("val_") :]: float(v) for k, v in last.items() if k.startswith("val_")}
    reached["training_time"] = float(sum(record.get("seconds", 0.0) for record in epochs))
    return reached


def trial_radii(frozen_trial: FrozenTrial) -> RadiiSummary | None:
    """The certificate radii a completed trial stored, or ``None`` when it stored none."""
    return TrialAttributes.read(frozen_trial, "radii").radii


def record_at_eps(record: TrialRecord, radii: RadiiSummary | None, eps: float) -> TrialRecord:
    """A copy of ``record`` whose ``values`` are those of :func:`eps_objectives` (``eps``).

    Certified accuracy at ``eps`` is recomputed from ``radii``; a completed trial without radii
    or without a clean accuracy gets ``values = None`` and drops out of fronts.
    """
    accuracy = record.metrics.get("accuracy")
    if record.state != "COMPLETE" or radii is None or accuracy is None:
        return record.model_copy(update={"values": None})
    certified_key = metric_key("certified_accuracy", eps)
    values = {"accuracy": float(accuracy), certified_key: float(radii.certified_accuracy(eps))}
    return record.model_copy(update={"values": values})


def _feasible(frozen_trial: FrozenTrial, spec: StudySpec, metrics: Mapping[str, float]) -> bool:
    constraints = frozen_trial.constraints  # Optuna's ``set_constraint`` values, by name
    if constraints:
        return all(value <= 0.0 for value in constraints.values())
    for requirement in spec.requirements:
        value = metrics.get(requirement.key)
        if value is None or requirement.violation(value) > 0.0:
            return False
    return True


def _isoformat(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


# --------------------------------------------------------------------------- fronts


def candidates(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """The records that compete: completed, with values, not known to be infeasible."""
    return [
        record
        for record in records
        if record.state == "COMPLETE" and record.values is not None and record.feasible is not False
    ]


def _losses(records: Sequence[TrialRecord], objectives: Sequence[ObjectiveEntry]) -> np.ndarray:
    """Values as an (N, M) array where smaller is better in every column (Optuna's convention)."""
    return as_losses(
        [[record.values[objective["key"]] for objective in objectives] for record in records],
        [objective["direction"] for objective in objectives],
    )


def pareto_front(
    records: Iterable[TrialRecord], objectives: Sequence[ObjectiveEntry]
) -> list[TrialRecord]:
    """The non-dominated feasible completed records, sorted by the first objective (best first).

    A record dominates another when it is at least as good in every objective and strictly
    better in one. Records whose values lack an objective or hold NaN are left out.
    """
    keys = [objective["key"] for objective in objectives]
    usable = [
        record
        for record in candidates(records)
        if all(key in record.values and not math.isnan(record.values[key]) for key in keys)
    ]
    if not usable:
        return []
    losses = _losses(usable, objectives)
    mask = non_dominated(losses)
    kept = [record for record, keep in zip(usable, mask, strict=True) if keep]
    order = np.lexsort(losses[mask][:, ::-1].T)
    return [kept[index] for index in order]


def pareto_front_at_eps(
    records: Iterable[TrialRecord], radii: Mapping[int, RadiiSummary | None], eps: float
) -> list[TrialRecord]:
    """The front in (accuracy, certified accuracy at ``eps``); ``radii`` maps trial number to the
    trial's :class:`RadiiSummary`. The returned records carry the eps values."""
    at_eps = [record_at_eps(record, radii.get(record.number), eps) for record in records]
    return pareto_front(at_eps, eps_objectives(eps))


def knee(front: Sequence[TrialRecord], objectives: Sequence[ObjectiveEntry]) -> TrialRecord | None:
    """The knee of a front: the trial closest to the ideal point once each objective is scaled
    to [0, 1] over the front (0 = the front's best, 1 = its worst), in Euclidean distance.

    With two objectives this is the point where giving up one objective stops buying much of the
    other. A one-point front is its own knee; an empty front has none.
    """
    if not front:
        return None
    losses = _losses(front, objectives)
    low, high = losses.min(axis=0), losses.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    distance = np.linalg.norm((losses - low) / span, axis=1)
    return front[int(np.argmin(distance))]


def reference_point(
    records: Iterable[TrialRecord], objectives: Sequence[ObjectiveEntry]
) -> list[float] | None:
    """The hypervolume reference point, in the objectives' own units.

    Accuracies, certified accuracies and the mean certified radius use 0 (their worst value), so
    the hypervolume of an accuracy/certified-accuracy study is the area (in [0, 1]^2) that the
    front dominates. ``training_time`` has no natural worst: it uses the longest training time
    among the completed trials. ``None`` when such a reference cannot be found.
    """
    completed = candidates(records)
    point = []
    for objective in objectives:
        if objective["metric"] in _ZERO_WORST_METRICS:
            point.append(0.0)
            continue
        observed = [
            value
            for record in completed
            if (value := record.values.get(objective["key"])) is not None
        ]
        if not observed:
            return None
        point.append(float(max(observed)))
    return point


def hypervolume(
    records: Iterable[TrialRecord],
    objectives: Sequence[ObjectiveEntry],
    reference: Sequence[float] | None = None,
) -> float | None:
    """The hypervolume dominated by the feasible completed records, bounded by ``reference``
    (default :func:`reference_point`), computed with Optuna's own WFG implementation.

    Points that do not improve on the reference in every objective add nothing. ``None`` when
    no reference point exists (no completed trial and a ``training_time`` objective).
    """
    records = list(records)
    if reference is None:
        reference = reference_point(records, objectives)
        if reference is None:
            return None
    front = pareto_front(records, objectives)
    signs = np.array([-1.0 if o["direction"] == "maximize" else 1.0 for o in objectives])
    reference_loss = np.asarray(reference, dtype=np.float64) * signs
    if not front:
        return 0.0
    losses = _losses(front, objectives)
    losses = losses[np.all(losses <= reference_loss, axis=1)]
    if losses.size == 0:
        return 0.0
    return float(moocore.hypervolume(losses, ref=reference_loss))


def best_so_far(
    records: Iterable[TrialRecord], objectives: Sequence[ObjectiveEntry]
) -> dict[str, dict[str, Any]]:
    """Per objective key, ``{"value", "trial"}`` of the best feasible completed trial (the
    earliest on ties); objectives without any such trial are left out."""
    completed = candidates(records)
    best: dict[str, dict[str, Any]] = {}
    for objective in objectives:
        key = objective["key"]
        sign = -1.0 if objective["direction"] == "maximize" else 1.0
        scored = [r for r in completed if key in r.values and not math.isnan(r.values[key])]
        if not scored:
            continue
        winner = min(scored, key=lambda r: (sign * r.values[key], r.number))
        best[key] = {"value": winner.values[key], "trial": winner.number}
    return best


def state_counts(records: Iterable[TrialRecord]) -> dict[str, int]:
    """The number of trials in each of :data:`TRIAL_STATES` (zeros included)."""
    counts = dict.fromkeys(TRIAL_STATES, 0)
    for record in records:
        counts[record.state] = counts.get(record.state, 0) + 1
    return counts


def epoch_counts(records: Iterable[TrialRecord], epochs_per_trial: int) -> dict[str, int]:
    """``spent``: the epochs the study's trials trained; ``saved``: the epochs its pruned trials
    did not train (``epochs_per_trial - pruned_at_epoch`` each)."""
    spent = saved = 0
    for record in records:
        spent += record.epochs_trained
        if record.state == "PRUNED" and record.pruned_at_epoch is not None:
            saved += max(0, epochs_per_trial - record.pruned_at_epoch)
    return {"spent": spent, "saved": saved}


def conditioned_view(
    spec: StudySpec, trials_spent: int, conditioned: dict[str, Any]
) -> dict[str, Any]:
    """``epochs_spent`` and ``conditioned_network`` of a study's detail: a ``train`` study spent
    its trials' epochs (``trials_spent``, :func:`epoch_counts`' ``spent``) and has no
    conditioned network; a conditional one spent its network's epochs
    (:data:`worker.study._studies.CONDITIONED_ATTR`)."""
    if not spec.conditional:
        return {"epochs_spent": trials_spent, "conditioned_network": None}
    network = {
        "status": conditioned.get("status", "waiting"),
        "epochs": int(conditioned.get("epochs", 0)),
        "epochs_total": spec.training.epochs,
        **{
            key: conditioned.get(key)
            for key in ("seconds", "worker", "mlflow_run_id", "failure_reason")
        },
    }
    return {
        "epochs_spent": int(conditioned.get("epochs_spent", 0)),
        "conditioned_network": network,
    }


def eta_seconds(records: Sequence[TrialRecord], n_trials: int, now: datetime) -> float | None:
    """Seconds until the study has ``n_trials`` completed trials, estimated as

    ``(remaining * mean_duration - elapsed_of_running) / max(1, running)``

    where ``mean_duration`` is the mean duration of the completed trials, ``remaining`` the
    completed trials still missing, and ``elapsed_of_running`` the time the running trials have
    already spent (each counted at most ``mean_duration``). ``0`` when the budget is met, ``None``
    before any trial completed. ``now`` must be comparable with the trials' start times.
    """
    completed = [r for r in records if r.state == "COMPLETE" and r.duration_s is not None]
    # a pruned trial used its slot of the budget
    remaining = n_trials - sum(r.state in ("COMPLETE", "PRUNED") for r in records)
    if remaining <= 0:
        return 0.0
    if not completed:
        return None
    mean_duration = float(np.mean([r.duration_s for r in completed]))
    running = [r for r in records if r.state == "RUNNING" and r.started_at is not None]
    elapsed = sum(
        min(mean_duration, max(0.0, (now - datetime.fromisoformat(r.started_at)).total_seconds()))
        for r in running
    )
    return max(0.0, (remaining * mean_duration - max(0.0, elapsed)) / max(1, len(running)))


# --------------------------------------------------------------------------- recommendation


@dataclass(frozen=True)
class RequirementMatch:
    """The answer to "which trial meets this requirement?".

    ``trial`` is the best record that meets every minimum (``None`` when none does). Otherwise
    ``closest`` is the record with the smallest total shortfall and ``shortfall`` what it misses
    per metric key (minimum - achieved, > 0), and ``best_achieved`` the best value any candidate
    reached per metric key.
    """

    trial: TrialRecord | None
    closest: TrialRecord | None = None
    shortfall: dict[str, float] = field(default_factory=dict)
    best_achieved: dict[str, float] = field(default_factory=dict)


def default_eps(spec: StudySpec) -> float:
    """The eps a study is about: its certified-accuracy objective's, else its first
    requirement's, else the smallest eps it reports at."""
    for item in (*spec.objectives, *spec.requirements):
        if item.metric == "certified_accuracy" and item.eps is not None:
            return item.eps
    reported = spec.report_eps()
    return reported[0] if reported else DEFAULT_REPORT_EPS[0]


@dataclass(frozen=True)
class RequirementAnswer:
    """:func:`recommend_for` 's answer: the ``minimums`` asked (metric key -> minimum), the key
    it maximised, the records at ``eps`` it chose among, and the :class:`RequirementMatch`."""

    eps: float
    minimums: dict[str, float]
    maximize: str
    records: list[TrialRecord]
    recommendation: RequirementMatch


def recommend_for(
    records: Iterable[TrialRecord],
    radii: Mapping[int, RadiiSummary | None],
    eps: float,
    *,
    min_accuracy: float | None = None,
    min_certified_accuracy: float | None = None,
) -> RequirementAnswer:
    """The best trial with clean accuracy >= ``min_accuracy`` and certified accuracy at ``eps``
    >= ``min_certified_accuracy`` (either may be ``None``, not both): the best accuracy when
    certified accuracy is required, else the best certified accuracy. Certified accuracy is
    recomputed from each trial's ``radii`` (trial number -> summary)."""
    certified = metric_key("certified_accuracy", eps)
    minimums: dict[str, float] = {}
    if min_accuracy is not None:
        minimums["accuracy"] = min_accuracy
    if min_certified_accuracy is not None:
        minimums[certified] = min_certified_accuracy
    if not minimums:
        raise ValueError("give min_accuracy and/or min_certified_accuracy")
    maximize = "accuracy" if min_certified_accuracy is not None else certified
    at_eps = [record_at_eps(r, radii.get(r.number), eps) for r in records]
    return RequirementAnswer(eps, minimums, maximize, at_eps, recommend(at_eps, minimums, maximize))


def recommend(
    records: Iterable[TrialRecord], minimums: Mapping[str, float], maximize: str
) -> RequirementMatch:
    """The candidate with the largest ``maximize`` value among those whose value of each key of
    ``minimums`` is at least its minimum (ties: the earliest trial).

    Values are looked up in a record's ``values`` first, then its ``metrics``, so records from
    :func:`record_at_eps` answer requirements on certified accuracy at any eps.
    """
    pool = candidates(records)
    meeting = [
        record
        for record in pool
        if record.value(maximize) is not None
        and all(
            (value := record.value(key)) is not None and value >= minimum
            for key, minimum in minimums.items()
        )
    ]
    if meeting:
        chosen = min(meeting, key=lambda r: (-r.value(maximize), r.number))  # type: ignore[operator]
        return RequirementMatch(trial=chosen)
    best_achieved = {}
    for key in minimums:
        achieved = [value for r in pool if (value := r.value(key)) is not None]
        if achieved:
            best_achieved[key] = max(achieved)

    def shortfall(record: TrialRecord) -> dict[str, float]:
        return {
            key: max(0.0, minimum - (record.value(key) or 0.0)) for key, minimum in minimums.items()
        }

    if not pool:
        return RequirementMatch(trial=None, best_achieved=best_achieved)
    closest = min(pool, key=lambda r: (sum(shortfall(r).values()), r.number))
    return RequirementMatch(
        trial=None, closest=closest, shortfall=shortfall(closest), best_achieved=best_achieved
    )
