"""Multi-objective early stopping: asynchronous successive halving on ranked objective vectors.

Rungs are epoch counts ``min_epochs * reduction_factor**k`` below the trial's last epoch. When a
trial finishes a rung's epoch, its vector of the study's objectives measured on the validation
split at that epoch (``training_time`` = the seconds trained so far) is ranked against every trial
that reached the same rung, itself included:

1. feasible trials (every requirement met on the validation split) before infeasible ones; the
   infeasible are ordered by their total violation;
2. the feasible by non-dominated sorting (front 0 first, directions respected; NaN counts worst:
   :mod:`worker.search._front`, which the API's Pareto fronts use too);
3. inside a front by crowding distance, largest first; equal vectors by trial number.

The trial continues only if its place is among the first ``ceil(n / reduction_factor)`` of the
``n`` ranked trials: the stopping form of ASHA's rule, so no worker waits for another to reach a
rung, and the first trial at a rung always continues.

Why crowding distance rather than hypervolume contribution for the tie-break: the objectives
have no natural reference point (``training_time``, ``mean_certified_radius`` are unbounded),
and a contribution measured against an arbitrary one decides which end of the front survives;
crowding distance is scale-free (each objective normalised by its range at the rung) and gives
both ends of the front an infinite distance, so the accurate end and the robust end of the
trade-off always survive a rung — exactly the two kinds of trials a trade-off study must keep.

Consistency across workers: a trial's epochs are stored in its record (one user-attribute
write, one transaction) before its own decision, and a decision reads only committed records
(:meth:`MOASHA.decide` takes them as data). Two workers deciding at once each see at least
every trial committed before their read: each decision is made exactly once, by the trial's
own worker, and no result is lost.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from worker.search._front import Direction, as_losses, non_dominated_fronts
from worker.spec import Objective, PrunerSpec, Requirement, StudySpec


def rungs(min_epochs: int, reduction_factor: int, epochs: int) -> list[int]:
    """The epochs at which trials of ``epochs`` epochs are ranked: ``min_epochs * rf**k`` for
    k = 0, 1, ... while below ``epochs`` (a trial at its last epoch completes anyway)."""
    if min_epochs < 1 or reduction_factor < 2:
        raise ValueError("min_epochs must be >= 1 and reduction_factor >= 2")
    found, rung = [], min_epochs
    while rung < epochs:
        found.append(rung)
        rung *= reduction_factor
    return found


@dataclass(frozen=True)
class RungResult:
    """One trial at one rung: its objective ``values`` (in the study's order) and its total
    requirement ``violation`` (0 when every requirement is met)."""

    trial: int
    values: tuple[float, ...]
    violation: float = 0.0

    @property
    def feasible(self) -> bool:
        return self.violation <= 0.0


def crowding_distance(points: Sequence[Sequence[float]]) -> list[float]:
    """NSGA-II's crowding distance of each point of one front: the sum over objectives of the
    gap between its two neighbours, divided by the objective's range (infinite at both ends of
    each objective; an objective of zero range adds nothing)."""
    n = len(points)
    if n <= 2:
        return [math.inf] * n
    distance = [0.0] * n
    for m in range(len(points[0])):
        order = sorted(range(n), key=lambda i: points[i][m])
        low, high = points[order[0]][m], points[order[-1]][m]
        span = high - low
        if not math.isfinite(span) or span <= 0.0:
            continue
        distance[order[0]] = distance[order[-1]] = math.inf
        for previous, current, following in zip(order, order[1:], order[2:], strict=False):
            distance[current] += (points[following][m] - points[previous][m]) / span
    return distance


def rank(results: Sequence[RungResult], directions: Sequence[Direction]) -> list[RungResult]:
    """``results`` best first (see the module docstring for the order)."""
    feasible = [r for r in results if r.feasible]
    infeasible = sorted(
        (r for r in results if not r.feasible), key=lambda r: (r.violation, r.trial)
    )
    points = as_losses([r.values for r in feasible], directions)
    # Crowding distance on the values turned larger-is-better, as ever: among equal values,
    # which point is an end of the front depends on the direction of its sort.
    gains = [tuple(row) for row in (-points).tolist()]
    ordered: list[RungResult] = []
    for front in non_dominated_fronts(points):
        distance = crowding_distance([gains[i] for i in front])
        by_place = sorted(range(len(front)), key=lambda k: (-distance[k], feasible[front[k]].trial))
        ordered.extend(feasible[front[k]] for k in by_place)
    return ordered + infeasible


def keeps(
    trial: int,
    results: Sequence[RungResult],
    directions: Sequence[Direction],
    reduction_factor: int,
) -> bool:
    """Whether ``trial`` (one of ``results``) is in the top ``ceil(n / reduction_factor)`` of
    the ``n`` results at its rung."""
    ordered = rank(results, directions)
    places = [r.trial for r in ordered]
    if trial not in places:
        raise ValueError(f"trial {trial} has no result at this rung")
    return places.index(trial) < math.ceil(len(ordered) / reduction_factor)


def validation_value(item: Objective, epochs: Sequence[Mapping[str, float]], epoch: int) -> float:
    """The value of an objective (or requirement) on the validation split after ``epoch``,
    from the per-epoch records ``epochs`` (each with ``epoch``, ``seconds`` and ``val_*``)."""
    if item.metric == "training_time":
        return float(sum(record["seconds"] for record in epochs if record["epoch"] <= epoch))
    record = next(record for record in epochs if record["epoch"] == epoch)
    return float(record["val_" + item.key])


class MOASHA:
    """The ``mo-asha`` pruner of a study: :meth:`decide` whether a trial stops at an epoch."""

    def __init__(self, spec: StudySpec) -> None:
        pruner: PrunerSpec = spec.pruner
        self.objectives: list[Objective] = list(spec.objectives)
        self.requirements: list[Requirement] = list(spec.requirements)
        self.directions = [objective.direction for objective in self.objectives]
        self.reduction_factor = pruner.reduction_factor
        self.rungs = rungs(pruner.min_epochs, pruner.reduction_factor, spec.training.epochs)

    def result(
        self, trial: int, epochs: Sequence[Mapping[str, float]], epoch: int
    ) -> RungResult | None:
        """The trial's result at the rung ``epoch``, or None when its records do not reach it."""
        if not any(record["epoch"] == epoch for record in epochs):
            return None
        values = tuple(validation_value(o, epochs, epoch) for o in self.objectives)
        violation = sum(
            max(0.0, r.violation(validation_value(r, epochs, epoch))) for r in self.requirements
        )
        return RungResult(trial, values, violation)

    def decide(
        self,
        trial: int,
        epochs: Sequence[Mapping[str, float]],
        others: Iterable[tuple[int, Sequence[Mapping[str, float]]]],
    ) -> bool:
        """True when ``trial``, whose records are ``epochs`` (its last one just finished),
        should stop now. ``others``: ``(trial number, epoch records)`` of the study's other
        trials as committed (any state: running, completed, pruned)."""
        epoch = int(epochs[-1]["epoch"])
        if epoch not in self.rungs:
            return False
        own = self.result(trial, epochs, epoch)
        assert own is not None, "the trial's last record is at the rung ``epoch``"
        results = [own]
        for number, records in others:
            if number == trial:
                continue
            other = self.result(number, records, epoch)
            if other is not None:
                results.append(other)
        return not keeps(trial, results, self.directions, self.reduction_factor)
