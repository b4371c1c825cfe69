"""Samplers rebuilt from a study spec: the ``auto`` choice, seeds, and what each one searches."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optuna
import pytest

from worker.search._samplers import (
    GP_MAX_TRIALS,
    LARGE_BUDGET,
    build_sampler,
    resolve_sampler,
    worker_seed,
)
from worker.search._space import suggest_params

optuna.logging.set_verbosity(optuna.logging.WARNING)

ONE_FAMILY_RANGES = {
    "loss": "hkr",
    "margin": {"low": 0.05, "high": 1.0, "log": True},
    "alpha_kr": {"low": 1.0, "high": 100.0, "log": True},
}


def test_the_default_sampler_is_guided(tiny_study_spec: Callable[..., Any]) -> None:
    assert resolve_sampler(tiny_study_spec()) == "guided"


def test_auto_takes_gp_for_a_small_numeric_space(tiny_study_spec: Callable[..., Any]) -> None:
    spec = tiny_study_spec(search_space=ONE_FAMILY_RANGES, n_trials=30, sampler="auto")
    assert resolve_sampler(spec) == "gp"
    assert isinstance(build_sampler(spec, 1), optuna.samplers.GPSampler)


@pytest.mark.parametrize(
    "search_space",
    [
        {"loss": ["hkr", "tau_ce"], "temperature": {"low": 1.0, "high": 10.0}},  # conditional
        {"loss": "hkr", "margin": {"low": 0.1, "high": 1.0}, "alpha_kr": [1.0, math.inf]},
        {"loss": "kr"},  # nothing numeric to model
    ],
)
def test_auto_takes_tpe_for_categorical_or_conditional_spaces(
    tiny_study_spec: Callable[..., Any], search_space: dict[str, Any]
) -> None:
    spec = tiny_study_spec(search_space=search_space, n_trials=30, sampler="auto")
    assert resolve_sampler(spec) == "tpe"
    assert isinstance(build_sampler(spec, 1), optuna.samplers.TPESampler)


def test_auto_leaves_gp_for_budgets_it_would_be_slow_on(
    tiny_study_spec: Callable[..., Any],
) -> None:
    medium = tiny_study_spec(
        search_space=ONE_FAMILY_RANGES, n_trials=GP_MAX_TRIALS + 1, sampler="auto"
    )
    assert resolve_sampler(medium) == "tpe"
    large = tiny_study_spec(
        search_space=ONE_FAMILY_RANGES, n_trials=LARGE_BUDGET + 1, sampler="auto"
    )
    assert resolve_sampler(large) == "nsga2"
    assert isinstance(build_sampler(large, 1), optuna.samplers.NSGAIISampler)


def test_a_baseline_of_another_family_makes_the_space_conditional(
    tiny_study_spec: Callable[..., Any],
) -> None:
    spec = tiny_study_spec(
        search_space=ONE_FAMILY_RANGES, baselines=[{"loss": "cosine"}], sampler="auto"
    )
    assert resolve_sampler(spec) == "tpe"


@pytest.mark.parametrize(
    ("name", "sampler_type"),
    [
        ("tpe", optuna.samplers.TPESampler),
        ("gp", optuna.samplers.GPSampler),
        ("nsga2", optuna.samplers.NSGAIISampler),
        ("random", optuna.samplers.RandomSampler),
        ("qmc", optuna.samplers.QMCSampler),
    ],
)
def test_samplers_by_name(
    tiny_study_spec: Callable[..., Any], name: str, sampler_type: type
) -> None:
    assert isinstance(build_sampler(tiny_study_spec(sampler=name), 3), sampler_type)


def test_grid_sampler_walks_the_whole_grid(tiny_study_spec: Callable[..., Any]) -> None:
    spec = tiny_study_spec(
        sampler="grid", search_space={"loss": "hkr", "margin": [0.1, 0.5], "alpha_kr": [1, 10]}
    )
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=build_sampler(spec, 0))
    seen = set()
    for _ in range(4):
        trial = study.ask()
        params = suggest_params(trial, spec.search_space)
        seen.add((params["margin"], params["alpha_kr"]))
        study.tell(trial, [0.5, 0.5])
    assert seen == {(0.1, 1.0), (0.1, 10.0), (0.5, 1.0), (0.5, 10.0)}


def test_grid_sampler_refuses_ranges(tiny_study_spec: Callable[..., Any]) -> None:
    with pytest.raises(ValueError, match="grid sampler needs a list of values"):
        build_sampler(tiny_study_spec(sampler="grid", search_space=ONE_FAMILY_RANGES), 0)


def test_workers_get_different_seeds_of_one_study() -> None:
    assert worker_seed(0, "host-1/10") == worker_seed(0, "host-1/10")
    assert len({worker_seed(0, f"host-1/{pid}") for pid in range(50)}) == 50
    assert worker_seed(0, "host-1/10") != worker_seed(1, "host-1/10")


def test_workers_share_one_qmc_sequence(tiny_study_spec: Callable[..., Any]) -> None:
    """Two workers' QMC samplers (different worker seeds) continue one sequence."""
    spec = tiny_study_spec(sampler="qmc", search_space=ONE_FAMILY_RANGES)

    def points(seeds: list[int]) -> list[tuple[float, float]]:
        storage = optuna.storages.InMemoryStorage()
        optuna.create_study(storage=storage, study_name="s", directions=["maximize"] * 2)
        found = []
        for seed in seeds:
            study = optuna.load_study(
                study_name="s", storage=storage, sampler=build_sampler(spec, seed)
            )
            trial = study.ask()
            params = suggest_params(trial, spec.search_space)
            found.append((params["margin"], params["alpha_kr"]))
            study.tell(trial, [0.1, 0.2])
        return found

    assert points([1, 2, 1, 2]) == points([7, 7, 7, 7])


def test_gp_handles_several_objectives_with_constraints(
    tiny_study_spec: Callable[..., Any],
) -> None:
    """Optuna 5's GPSampler models two objectives and a constraint set with set_constraint."""
    spec = tiny_study_spec(search_space=ONE_FAMILY_RANGES, n_trials=12, sampler="gp")
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=build_sampler(spec, 0))
    for _ in range(6):
        trial = study.ask()
        params = suggest_params(trial, spec.search_space)
        accuracy = 1.0 - params["margin"]
        trial.set_constraint("accuracy>=0.5", 0.5 - accuracy)
        study.tell(trial, [accuracy, params["margin"] / 2])
    assert all(len(trial.constraints) == 1 for trial in study.trials)
    assert len(study.best_trials) >= 1
    assert all(trial.constraints["accuracy>=0.5"] <= 0 for trial in study.best_trials)


def test_a_walked_grid_does_not_stop_an_ask_tell_study(tiny_study_spec: Callable[..., Any]) -> None:
    spec = tiny_study_spec(sampler="grid", search_space={"loss": "hkr", "margin": [0.1, 0.5]})
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=build_sampler(spec, 0))
    for _ in range(3):  # one more than the grid holds: the budget decides, not the grid
        trial = study.ask()
        assert suggest_params(trial, spec.search_space)["margin"] in (0.1, 0.5)
        study.tell(trial, [0.5, 0.5])
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 3
