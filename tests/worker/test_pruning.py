"""The rung ranking of the ``mo-asha`` pruner, on synthetic objective vectors."""

from __future__ import annotations

import itertools
import math

import pytest
from pydantic import ValidationError

from worker.search._front import non_dominated_fronts
from worker.search._pruning import (
    MOASHA,
    RungResult,
    crowding_distance,
    keeps,
    rank,
    rungs,
)
from worker.spec import StudySpec

MAX2 = ["maximize", "maximize"]


def _dominated_by_brute_force(points: list[tuple[float, ...]]) -> list[int]:
    """Front index of each point by peeling the non-dominated set, the definition itself."""
    remaining, level, fronts = set(range(len(points))), 0, [0] * len(points)
    while remaining:
        top = {
            i
            for i in remaining
            if not any(
                all(a >= b for a, b in zip(points[j], points[i], strict=True))
                and points[j] != points[i]
                for j in remaining
            )
        }
        for i in top:
            fronts[i] = level
        remaining -= top
        level += 1
    return fronts


def test_rungs_are_geometric_and_below_the_last_epoch() -> None:
    assert rungs(1, 3, 10) == [1, 3, 9]
    assert rungs(1, 3, 9) == [1, 3]
    assert rungs(2, 2, 17) == [2, 4, 8, 16]
    assert rungs(5, 3, 5) == []
    with pytest.raises(ValueError, match="reduction_factor"):
        rungs(1, 1, 10)


def test_fronts_match_the_definition_on_random_vectors() -> None:
    import random

    generator = random.Random(0)
    for _ in range(20):
        points = [
            tuple(generator.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(3)) for _ in range(12)
        ]
        fronts = non_dominated_fronts([[-value for value in point] for point in points])
        assert sorted(itertools.chain(*fronts)) == list(range(12))
        level = {i: k for k, front in enumerate(fronts) for i in front}
        assert [level[i] for i in range(12)] == _dominated_by_brute_force(points)


def test_crowding_distance_keeps_both_ends_and_orders_the_middle() -> None:
    front = [(0.0, 1.0), (0.1, 0.9), (0.5, 0.5), (1.0, 0.0)]
    distance = crowding_distance(front)
    assert distance[0] == math.inf and distance[3] == math.inf
    # (0.5, 0.5) has neighbours (0.1, 0.9) and (1.0, 0.0): gaps 0.9 + 0.9
    assert distance[2] == pytest.approx(1.8)
    assert distance[1] == pytest.approx(0.5 + 0.5)


def test_a_dominated_trial_is_pruned_and_a_non_dominated_one_kept() -> None:
    results = [
        RungResult(0, (0.90, 0.30)),
        RungResult(1, (0.60, 0.70)),
        RungResult(2, (0.80, 0.50)),
        RungResult(3, (0.50, 0.20)),  # dominated by every other
        RungResult(4, (0.70, 0.40)),  # dominated by 2
        RungResult(5, (0.85, 0.25)),  # dominated by 0
    ]
    assert [r.trial for r in rank(results, MAX2)[:3]] == [0, 1, 2]  # ends first, then middle
    assert keeps(0, results, MAX2, 3) and keeps(1, results, MAX2, 3)
    assert not keeps(3, results, MAX2, 3)
    assert not keeps(4, results, MAX2, 3)
    assert not keeps(5, results, MAX2, 3)
    # with a factor of 2, three continue: the whole first front
    assert keeps(2, results, MAX2, 2)


def test_directions_are_respected() -> None:
    # accuracy up, training time down: the fast accurate trial dominates
    directions = ["maximize", "minimize"]
    results = [RungResult(0, (0.9, 10.0)), RungResult(1, (0.8, 20.0)), RungResult(2, (0.7, 30.0))]
    assert [r.trial for r in rank(results, directions)] == [0, 1, 2]
    assert [r.trial for r in rank(results, MAX2)][-1] == 1  # maximised: 0 and 2 both ends


def test_ties_are_broken_by_trial_number_and_nan_counts_worst() -> None:
    results = [RungResult(7, (0.5, 0.5)), RungResult(3, (0.5, 0.5)), RungResult(5, (0.5, 0.5))]
    assert [r.trial for r in rank(results, MAX2)] == [3, 5, 7]
    assert keeps(3, results, MAX2, 3) and not keeps(5, results, MAX2, 3)
    with_nan = [RungResult(0, (math.nan, 0.9)), RungResult(1, (0.1, 0.9))]
    assert rank(with_nan, MAX2)[0].trial == 1


def test_an_infeasible_trial_ranks_after_every_feasible_one() -> None:
    results = [
        RungResult(0, (0.99, 0.99), violation=0.01),  # best values, but infeasible
        RungResult(1, (0.10, 0.10)),
        RungResult(2, (0.20, 0.05)),
        RungResult(3, (0.50, 0.50), violation=0.3),
    ]
    assert [r.trial for r in rank(results, MAX2)] == [1, 2, 0, 3]
    assert not keeps(0, results, MAX2, 2)
    assert keeps(1, results, MAX2, 2)


def test_a_single_objective_is_a_quantile_rule() -> None:
    results = [RungResult(i, (value,)) for i, value in enumerate([0.3, 0.9, 0.1, 0.5, 0.7, 0.2])]
    kept = [r.trial for r in results if keeps(r.trial, results, ["maximize"], 3)]
    assert kept == [1, 4]
    kept_min = [r.trial for r in results if keeps(r.trial, results, ["minimize"], 3)]
    assert kept_min == [2, 5]


def test_the_first_trial_at_a_rung_continues() -> None:
    assert keeps(0, [RungResult(0, (0.0, 0.0))], MAX2, 3)
    with pytest.raises(ValueError, match="no result"):
        keeps(1, [RungResult(0, (0.0, 0.0))], MAX2, 3)


def _spec(**pruner: object) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "p",
            "dataset": {"name": "digits"},
            "training": {"epochs": 10},
            "objectives": [
                {"metric": "accuracy"},
                {"metric": "certified_accuracy", "eps": 0.3},
                {"metric": "training_time"},
            ],
            "requirements": [{"metric": "accuracy", "min": 0.5}],
            "pruner": {"name": "mo-asha", **pruner},
        }
    )


def _epochs(*rows: tuple[float, float]) -> list[dict[str, float]]:
    return [
        {
            "epoch": k + 1,
            "seconds": 2.0,
            "val_accuracy": accuracy,
            "val_certified_accuracy_eps_0.3": certified,
        }
        for k, (accuracy, certified) in enumerate(rows)
    ]


def test_the_pruner_ranks_validation_vectors_with_time_so_far_and_requirements() -> None:
    pruner = MOASHA(_spec())
    assert pruner.rungs == [1, 3, 9]
    good = _epochs((0.8, 0.5), (0.85, 0.55), (0.9, 0.6))
    result = pruner.result(0, good, 3)
    assert result == RungResult(0, (0.9, 0.6, 6.0), 0.0)
    infeasible = pruner.result(1, _epochs((0.3, 0.2)), 1)
    assert infeasible is not None and infeasible.violation == pytest.approx(0.2)
    assert pruner.result(2, _epochs((0.3, 0.2)), 3) is None  # not at the rung yet
    # epoch 2 is no rung: never pruned there
    assert not pruner.decide(5, _epochs((0.1, 0.0), (0.1, 0.0)), [(0, good)])
    others = [(0, good), (1, _epochs((0.95, 0.7))), (2, _epochs((0.9, 0.65)))]
    # at rung 1: a hopeless trial (below the requirement) is stopped, a dominating one kept
    assert pruner.decide(3, _epochs((0.1, 0.0)), others)
    assert not pruner.decide(4, _epochs((0.99, 0.9)), others)


def test_the_pruner_spec_is_checked() -> None:
    assert StudySpec.model_validate({"name": "p", "dataset": {"name": "digits"}}).pruner.name == (
        "none"
    )
    with pytest.raises(ValidationError, match="min_epochs"):
        _spec(min_epochs=10)
    with pytest.raises(ValidationError, match="reduction_factor"):
        _spec(reduction_factor=1)
    with pytest.raises(ValidationError, match="name"):
        _spec(name="hyperband")
    with pytest.raises(ValidationError, match="PGD"):
        StudySpec.model_validate(
            {
                "name": "p",
                "dataset": {"name": "digits"},
                "objectives": [{"metric": "empirical_robust_accuracy", "eps": 0.3}],
                "pgd": {},
                "pruner": {"name": "mo-asha"},
            }
        )
