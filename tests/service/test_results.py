"""Unit tests of service/results.py: records, fronts, knee, hypervolume, recommendations."""

from __future__ import annotations

import itertools
import math
from datetime import datetime, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from service import results
from service.schemas import TrialRecord
from worker.spec import StudySpec
from worker.trial._certificates import RadiiSummary

SPEC = StudySpec.model_validate(
    {
        "name": "unit",
        "dataset": {"name": "digits"},
        "search_space": {"loss": ["hkr", "tau_ce"]},
        "objectives": [{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.3}],
    }
)
OBJECTIVES = results.objective_entries(SPEC)
CERT = "certified_accuracy_eps_0.3"


def _record(number, accuracy, certified, *, state="COMPLETE", feasible=True, duration=10.0):
    done = state == "COMPLETE"
    return TrialRecord.model_validate(
        {
            "number": number,
            "state": state,
            "params": {"loss": "hkr", "margin": 0.5, "alpha_kr": 10.0},
            "values": {"accuracy": accuracy, CERT: certified} if done else None,
            "metrics": {"accuracy": accuracy, CERT: certified} if done else {},
            "feasible": feasible if done else None,
            "failure_reason": None,
            "mlflow_run_id": None,
            "model_uri": None,
            "started_at": datetime(2024, 1, 1).isoformat(),
            "completed_at": None,
            "duration_s": duration if done else None,
            "retry_of": None,
            "epochs_trained": 0,
            "pruned_at_epoch": None,
            "values_reached": None,
        }
    )


def test_trial_record_of_a_completed_hkr_trial_with_infinite_alpha():
    radii = RadiiSummary.from_arrays(np.array([0.1, 0.5, 0.9, 0.2]), np.array([1, 1, 1, 0]))
    trial = create_trial(
        params={"loss": "hkr", "margin": 0.4, "alpha_kr": math.inf},
        distributions={
            "loss": CategoricalDistribution(["hkr", "tau_ce"]),
            "margin": FloatDistribution(0.01, 2.0, log=True),
            "alpha_kr": CategoricalDistribution([10.0, math.inf]),
        },
        values=[0.9, 0.6],
        user_attrs={
            "liptune.metrics": {"accuracy": 0.9, CERT: 0.6, "mean_certified_radius": 0.3},
            "liptune.radii": radii.encode(),
            "liptune.mlflow_run_id": "abc",
            "liptune.model_uri": "models:/m-1",
            "liptune.retry_of": 3,
        },
    )
    record = results.trial_record(trial, SPEC)
    assert record.state == "COMPLETE"
    assert record.params == {"loss": "hkr", "margin": 0.4, "alpha_kr": math.inf}
    assert record.values == {"accuracy": 0.9, CERT: 0.6}
    assert record.metrics["mean_certified_radius"] == 0.3
    assert record.feasible is True
    assert (record.mlflow_run_id, record.model_uri, record.retry_of) == (
        "abc",
        "models:/m-1",
        3,
    )
    assert record.duration_s == 0.0
    decoded = results.trial_radii(trial)
    assert decoded is not None and decoded.n == 4
    at_eps = results.record_at_eps(record, decoded, 0.3)
    assert at_eps.values == {"accuracy": 0.9, CERT: pytest.approx(0.5)}
    assert record.values[CERT] == 0.6  # the copy left the original alone


def test_trial_record_of_failed_and_infeasible_trials():
    failed = create_trial(
        state=TrialState.FAIL,
        params={"loss": "tau_ce", "temperature": 5.0},
        distributions={
            "loss": CategoricalDistribution(["hkr", "tau_ce"]),
            "temperature": FloatDistribution(0.1, 100.0),
        },
        user_attrs={"liptune.failure_reason": "loss diverged (nan)"},
    )
    record = results.trial_record(failed, SPEC)
    assert record.values is None and record.feasible is None
    assert record.params == {"loss": "tau_ce", "temperature": 5.0}
    assert record.failure_reason == "loss diverged (nan)"

    infeasible = create_trial(
        params={"loss": "kr"},
        distributions={"loss": CategoricalDistribution(["kr"])},
        values=[0.5, 0.1],
        constraints={"certified_accuracy_eps_0.5>=0.6": 0.2},
    )
    assert results.trial_record(infeasible, SPEC).feasible is False


def test_pareto_front_keeps_only_non_dominated_feasible_completed_trials():
    records = [
        _record(0, 0.90, 0.20),
        _record(1, 0.80, 0.50),
        _record(2, 0.70, 0.40),  # dominated by 1
        _record(3, 0.60, 0.60),
        _record(4, 0.95, 0.90, feasible=False),
        _record(5, 0.0, 0.0, state="RUNNING"),
        _record(6, 0.80, 0.50),  # ties with 1: both stay
    ]
    front = results.pareto_front(records, OBJECTIVES)
    assert [r.number for r in front] == [0, 1, 6, 3]


def test_pareto_front_at_eps_is_recomputed_from_the_radii():
    records = [_record(0, 0.9, 0.0), _record(1, 0.8, 0.0)]
    # trial 0: many small radii; trial 1: fewer correct points but large radii
    radii = {
        0: RadiiSummary.from_arrays(np.full(10, 0.05), np.ones(10, bool)),
        1: RadiiSummary.from_arrays(np.full(10, 2.0), np.arange(10) < 8),
    }
    front_small = results.pareto_front_at_eps(records, radii, 0.01)
    assert [r.number for r in front_small] == [0]
    front_large = results.pareto_front_at_eps(records, radii, 1.0)
    assert [r.number for r in front_large] == [0, 1]
    assert front_large[1].values["certified_accuracy_eps_1"] == pytest.approx(0.8)


def test_knee_is_the_balanced_point():
    front = [_record(0, 0.99, 0.0), _record(1, 0.8, 0.7), _record(2, 0.3, 0.75)]
    assert results.knee(front, OBJECTIVES).number == 1
    assert results.knee([], OBJECTIVES) is None


def test_hypervolume_of_a_two_point_front_is_the_union_of_two_boxes():
    records = [_record(0, 0.9, 0.2), _record(1, 0.5, 0.6), _record(2, 0.4, 0.1)]
    # reference (0, 0): boxes 0.9*0.2 and 0.5*0.6 overlap in 0.5*0.2
    expected = 0.9 * 0.2 + 0.5 * 0.6 - 0.5 * 0.2
    assert results.hypervolume(records, OBJECTIVES) == pytest.approx(expected)
    assert results.hypervolume([], OBJECTIVES) == 0.0


def test_hypervolume_reference_for_training_time_is_the_slowest_trial():
    objectives = [
        {"key": "accuracy", "metric": "accuracy", "eps": None, "direction": "maximize"},
        {"key": "training_time", "metric": "training_time", "eps": None, "direction": "minimize"},
    ]
    records = []
    for number, (accuracy, seconds) in enumerate([(0.9, 10.0), (0.5, 2.0)]):
        record = _record(number, accuracy, 0.0)
        records.append(
            record.model_copy(update={"values": {"accuracy": accuracy, "training_time": seconds}})
        )
    assert results.reference_point(records, objectives) == [0.0, 10.0]
    assert results.hypervolume(records, objectives) == pytest.approx(0.5 * 8.0)
    assert results.hypervolume([], objectives) is None


def test_best_so_far_counts_and_eta():
    records = [
        _record(0, 0.9, 0.2, duration=10.0),
        _record(1, 0.5, 0.6, duration=30.0),
        _record(2, 0.99, 0.99, feasible=False),
        _record(3, 0.0, 0.0, state="RUNNING"),
        _record(4, 0.0, 0.0, state="FAIL"),
    ]
    best = results.best_so_far(records, OBJECTIVES)
    assert best == {"accuracy": {"value": 0.9, "trial": 0}, CERT: {"value": 0.6, "trial": 1}}
    assert results.state_counts(records) == {
        "COMPLETE": 3,
        "RUNNING": 1,
        "WAITING": 0,
        "FAIL": 1,
        "PRUNED": 0,
    }
    # mean duration 50/3 s; 3 complete of 6; the running trial started 5 s ago
    now = datetime(2024, 1, 1) + timedelta(seconds=5)
    assert results.eta_seconds(records, 6, now) == pytest.approx(3 * 50 / 3 - 5)
    assert results.eta_seconds(records, 3, now) == 0.0
    assert results.eta_seconds(records[3:], 5, now) is None


def test_recommend_best_trial_meeting_the_requirement_or_how_close():
    records = [_record(0, 0.9, 0.2), _record(1, 0.8, 0.5), _record(2, 0.6, 0.7)]
    chosen = results.recommend(records, {CERT: 0.45}, maximize="accuracy")
    assert chosen.trial.number == 1
    missed = results.recommend(records, {CERT: 0.8, "accuracy": 0.5}, maximize="accuracy")
    assert missed.trial is None
    assert missed.closest.number == 2
    assert missed.shortfall == {CERT: pytest.approx(0.1), "accuracy": 0.0}
    assert missed.best_achieved == {CERT: 0.7, "accuracy": 0.9}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 1, width=16), st.floats(0, 1, width=16)), min_size=1, max_size=25
    )
)
def test_front_is_exactly_the_set_of_undominated_points(points):
    records = [_record(i, a, c) for i, (a, c) in enumerate(points)]
    front = {r.number for r in results.pareto_front(records, OBJECTIVES)}
    for i, j in itertools.permutations(range(len(points)), 2):
        dominated = all(x <= y for x, y in zip(points[i], points[j], strict=True)) and (
            points[i] != points[j]
        )
        if dominated:
            assert i not in front
    for i in range(len(points)):
        if i not in front:
            assert any(
                all(x <= y for x, y in zip(points[i], points[j], strict=True))
                and points[i] != points[j]
                for j in range(len(points))
            )
