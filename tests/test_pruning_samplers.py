"""Samplers in multi-objective studies with pruned trials, and the ``guided`` first batch."""

from __future__ import annotations

import math
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from worker.samplers import (
    SAMPLER_DESCRIPTIONS,
    GuidedSampler,
    build_sampler,
    guideline_points,
    resolve_sampler,
)
from worker.search_space import suggest_params
from worker.spec import SAMPLERS, SearchSpace, StudySpec

SPACE = {
    "loss": ["hkr", "tau_ce"],
    "margin": [0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0],
    "alpha_kr": [1.0, 10.0, 100.0, 1000.0, math.inf],
    "temperature": [0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0],
}


def _spec(sampler: str, space: dict | None = None, n_trials: int = 30) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "s",
            "dataset": {"name": "digits"},
            "search_space": space or SPACE,
            "n_trials": n_trials,
            "sampler": sampler,
            "pruner": {"name": "mo-asha"},
        }
    )


def _toy_values(params: dict) -> tuple[float, float]:
    """A synthetic trade-off: accuracy up with the temperature / down with the margin."""
    if params["loss"] == "tau_ce":
        t = params["temperature"]
        return 1 - 1 / (1 + t), 1 / (1 + t)
    m = params.get("margin", 0.5)
    return 1 / (1 + m), m / (1 + m)


@pytest.mark.parametrize(
    "space",
    [
        SPACE,
        {
            "loss": "hkr",
            "margin": {"low": 0.01, "high": 5.0, "log": True},
            "alpha_kr": {"low": 1.0, "high": 1000.0, "log": True},
        },
    ],
    ids=["tpe-conditional", "gp-numeric"],
)
def test_model_based_samplers_keep_working_with_pruned_trials(space: dict) -> None:
    """Half the trials end PRUNED without values (Optuna 5 refuses values for a pruned
    multi-objective trial); TPE and GP must still suggest valid points past their start-up."""
    spec = _spec("auto", space)
    name = resolve_sampler(spec)
    assert name == ("tpe" if "temperature" in space else "gp")
    study = optuna.create_study(
        directions=["maximize", "maximize"], sampler=build_sampler(spec, seed=0)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for number in range(24):
            trial = study.ask()
            params = suggest_params(trial, spec.search_space)
            if number % 2:
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, list(_toy_values(params)))
    states = [t.state for t in study.trials]
    assert states.count(TrialState.PRUNED) == 12 and states.count(TrialState.COMPLETE) == 12
    assert all(t.values is None for t in study.trials if t.state == TrialState.PRUNED)
    assert len(study.best_trials) >= 1


def test_guided_points_walk_the_guideline_curves() -> None:
    points = guideline_points(SearchSpace.model_validate(SPACE), 4)
    temperatures = [p["temperature"] for p in points if p["loss"] == "tau_ce"]
    assert temperatures == [0.03, 0.3, 10.0, 100.0]
    hinge_only = [p["margin"] for p in points if p["loss"] == "hkr" and p["alpha_kr"] == math.inf]
    assert hinge_only == [0.01, 0.2, 1.0, 5.0]
    alphas = [p["alpha_kr"] for p in points if p["loss"] == "hkr" and p["alpha_kr"] != math.inf]
    assert alphas == [1.0, 10.0, 1000.0]
    middle = {p["margin"] for p in points if p["loss"] == "hkr" and p["alpha_kr"] != math.inf}
    assert middle == {0.2}
    # families interleaved: a small budget sees both
    assert [p["loss"] for p in points[:2]] == ["hkr", "tau_ce"]
    ranged = guideline_points(
        SearchSpace.model_validate(
            {"loss": "hkr", "margin": {"low": 0.001, "high": 50.0}, "alpha_kr": 100.0}
        ),
        4,
    )
    margins = [p["margin"] for p in ranged]
    assert margins[0] == pytest.approx(0.01) and margins[-1] == pytest.approx(5.0)


def test_the_guided_sampler_trains_its_points_first_then_refines() -> None:
    spec = _spec("guided")
    sampler = build_sampler(spec, seed=0)
    assert isinstance(sampler, GuidedSampler)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    suggested = []
    for number in range(20):
        trial = study.ask()
        params = suggest_params(trial, spec.search_space)
        suggested.append(params)
        if number % 3 == 2:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, list(_toy_values(params)))
    assert suggested[: len(sampler.points)] == sampler.points
    later = suggested[len(sampler.points) :]
    assert all(p["loss"] in ("hkr", "tau_ce") for p in later)
    # the refining sampler is TPE (what auto picks for this space), seeded: same run, same points
    again = optuna.create_study(
        directions=["maximize", "maximize"], sampler=build_sampler(spec, seed=0)
    )
    for number, expected in enumerate(suggested):
        trial = again.ask()
        assert suggest_params(trial, spec.search_space) == expected
        if number % 3 == 2:
            again.tell(trial, state=TrialState.PRUNED)
        else:
            again.tell(trial, list(_toy_values(expected)))


def test_the_catalogue_describes_every_sampler_and_the_pruner() -> None:
    from service.routers.catalog import list_samplers

    listed = list_samplers()
    assert [item["name"] for item in listed["items"]] == list(SAMPLER_DESCRIPTIONS)
    assert set(SAMPLER_DESCRIPTIONS) == set(SAMPLERS)
    assert listed["pruner"]["name"]["choices"] == ["none", "mo-asha"]
    assert listed["pruner"]["reduction_factor"]["minimum"] == 2
