"""Samplers in multi-objective studies with pruned trials, and the ``guided`` first batch."""

from __future__ import annotations

import math
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from worker.search._samplers import (
    SAMPLER_DESCRIPTIONS,
    BestOf,
    GuidedSampler,
    build_sampler,
    eps_anchors,
    guideline_points,
    resolve_sampler,
)
from worker.search._space import suggest_params
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


def test_guided_points_walk_the_guideline_curves_from_the_middle_out() -> None:
    points = guideline_points(SearchSpace.model_validate(SPACE), 8)
    temperatures = [p["temperature"] for p in points if p["loss"] == "tau_ce"]
    # the upper of the two middles (the accurate side) first, then alternating outwards
    assert temperatures == [3.0, 10.0, 1.0, 30.0, 0.3, 100.0, 0.1, 0.03]
    hinge_only = [p["margin"] for p in points if p["loss"] == "hkr" and p["alpha_kr"] == math.inf]
    # a smaller margin is the accurate side
    assert hinge_only == [0.5, 0.2, 1.0, 0.05, 2.0, 0.01, 5.0]
    alphas = [p["alpha_kr"] for p in points if p["loss"] == "hkr" and p["alpha_kr"] != math.inf]
    assert alphas == [1000.0, 100.0, 10.0, 1.0]
    middle = {p["margin"] for p in points if p["loss"] == "hkr" and p["alpha_kr"] != math.inf}
    assert middle == {0.5}
    # families interleaved, the one-parameter family first: a small budget sees both
    assert [p["loss"] for p in points[:2]] == ["tau_ce", "hkr"]
    # a shorter ladder is evenly picked from the list, still walked from its middle
    short = guideline_points(SearchSpace.model_validate(SPACE), 4)
    assert [p["temperature"] for p in short if p["loss"] == "tau_ce"] == [10.0, 100.0, 0.3, 0.03]
    ranged = guideline_points(
        SearchSpace.model_validate(
            {"loss": "hkr", "margin": {"low": 0.001, "high": 50.0}, "alpha_kr": 100.0}
        ),
        4,
    )
    margins = sorted(p["margin"] for p in ranged)
    assert margins[0] == pytest.approx(0.01) and margins[-1] == pytest.approx(5.0)


def _anchored(objectives: list[dict], **spec: object) -> StudySpec:
    return StudySpec.model_validate(
        {"name": "s", "dataset": {"name": "digits"}, "objectives": objectives, **spec}
    )


@pytest.mark.parametrize(
    ("spec", "margin", "temperature", "first_temperatures", "first_margins"),
    [
        # global head: radius (top1 - top2) / sqrt(2), so the gap g = sqrt(2) eps
        (
            _anchored([{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.5}]),
            math.sqrt(0.5),
            math.sqrt(2),
            [1.0, 3.0, 0.3],
            [0.5, 0.2, 1.0],
        ),
        (
            _anchored([{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.1}]),
            math.sqrt(0.02),
            1 / math.sqrt(0.02),
            [10.0, 30.0, 3.0],
            [0.2, 0.05, 0.5],
        ),
        # classwise head: radius (top1 - top2) / 2
        (
            _anchored(
                [{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.5}],
                model={"name": "mlp", "head": "classwise"},
            ),
            1.0,
            1.0,
            [1.0, 3.0, 0.3],
            [1.0, 0.5, 2.0],
        ),
        # binary head: radius |f(x)| = gap, the hinge pushes y f(x) to margin / 2
        (
            _anchored(
                [{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.5}],
                dataset={"name": "digits", "classes": [3, 8]},
            ),
            1.0,
            2.0,
            [3.0, 10.0, 1.0],
            [1.0, 0.5, 2.0],
        ),
        # a requirement's eps counts; several eps: their geometric mean
        (
            _anchored(
                [{"metric": "accuracy"}, {"metric": "mean_certified_radius"}],
                requirements=[{"metric": "certified_accuracy", "eps": 0.5, "min": 0.3}],
            ),
            math.sqrt(0.5),
            math.sqrt(2),
            [1.0, 3.0, 0.3],
            [0.5, 0.2, 1.0],
        ),
        (
            _anchored(
                [
                    {"metric": "certified_accuracy", "eps": 0.05},
                    {"metric": "certified_accuracy", "eps": 5.0},
                ]
            ),
            math.sqrt(0.5),
            math.sqrt(2),
            [1.0, 3.0, 0.3],
            [0.5, 0.2, 1.0],
        ),
    ],
    ids=["global-0.5", "global-0.1", "classwise", "binary", "requirement", "geometric-mean"],
)
def test_guided_ladders_start_where_the_loss_margin_certifies_the_objectives_eps(
    spec, margin, temperature, first_temperatures, first_margins
) -> None:
    anchors = eps_anchors(spec)
    assert anchors["margin"] == pytest.approx(margin)
    assert anchors["temperature"] == pytest.approx(temperature)
    points = guideline_points(SearchSpace.model_validate(SPACE), 8, anchors)
    temperatures = [p["temperature"] for p in points if p["loss"] == "tau_ce"]
    hinge_only = [p["margin"] for p in points if p["loss"] == "hkr" and p["alpha_kr"] == math.inf]
    assert temperatures[:3] == first_temperatures
    assert hinge_only[:3] == first_margins
    assert sorted(temperatures) == sorted(SPACE["temperature"])  # the whole ladder, reordered
    # the alpha_kr ladder runs at the first margin
    at_alphas = {p["margin"] for p in points if p["loss"] == "hkr" and p["alpha_kr"] != math.inf}
    assert at_alphas == {first_margins[0]}


OFFSET_SPACE = {
    "loss": ["offset_ce", "tau_ce"],
    "margin": [0.05, 0.1, 0.2, 0.5, 1.0, 2.0],
    "temperature": [1.0, 3.0, 10.0, 30.0, 100.0],
}


@pytest.mark.parametrize(
    ("spec", "offset", "first_margin"),
    [
        # global head: the offset asks f_y - f_j >= m, which certifies m / sqrt(2)
        (
            _anchored([{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.1}]),
            math.sqrt(0.02),
            0.1,
        ),
        # binary head: y f(x) >= m certifies m itself (no halving, unlike the HKR hinge)
        (
            _anchored(
                [{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.5}],
                dataset={"name": "digits", "classes": [3, 8]},
            ),
            0.5,
            0.5,
        ),
    ],
    ids=["global-0.1", "binary-0.5"],
)
def test_the_offset_ce_ladder_starts_at_the_certifying_offset(spec, offset, first_margin) -> None:
    anchors = eps_anchors(spec)
    assert anchors["offset_margin"] == pytest.approx(offset)
    points = [
        p
        for p in guideline_points(SearchSpace.model_validate(OFFSET_SPACE), 8, anchors)
        if p["loss"] == "offset_ce"
    ]
    # the temperature walk at that offset, the whole ladder from its middle, accurate side first
    walk = [p for p in points if not isinstance(p["temperature"], BestOf)]
    assert {p["margin"] for p in walk} == {first_margin}
    assert [p["temperature"] for p in walk] == [10.0, 30.0, 3.0, 100.0, 1.0]
    # then the offset walk, outwards from that offset, at the best of those temperatures
    offsets = points[len(walk) :]
    assert sorted([first_margin] + [p["margin"] for p in offsets]) == OFFSET_SPACE["margin"]
    best = BestOf("temperature", (("loss", "offset_ce"), ("margin", first_margin)), 10.0)
    assert all(p["temperature"] == best for p in offsets)
    assert points[0] == {"loss": "offset_ce", "margin": first_margin, "temperature": 10.0}


def test_the_offset_walk_takes_the_best_temperature_of_the_completed_trials() -> None:
    spec = _spec("guided", {**OFFSET_SPACE, "loss": "offset_ce"}).model_copy(
        update={
            "objectives": _anchored(
                [{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.1}]
            ).objectives
        }
    )
    sampler = build_sampler(spec, seed=0)
    assert sampler.rank == (1, 1.0)  # the certified accuracy decides
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    # Before any trial completes, a BestOf falls back to the temperature walk's start.
    choice = sampler.points[-1]["temperature"]
    assert sampler.best(study, choice) == 10.0
    suggested = []
    for _ in range(len(sampler.points)):
        trial = study.ask()
        params = suggest_params(trial, spec.search_space)
        suggested.append(params)
        # a toy front: certified accuracy peaks at temperature 3 (accuracy grows with it)
        t = params["temperature"]
        study.tell(trial, [t / (1 + t), 1.0 - abs(math.log(t / 3.0))])
    walk = [p for p in sampler.points if not isinstance(p["temperature"], BestOf)]
    assert suggested[: len(walk)] == walk
    offsets = suggested[len(walk) :]
    assert offsets and all(p["temperature"] == 3.0 for p in offsets)
    assert [p["margin"] for p in offsets] == [p["margin"] for p in sampler.points[len(walk) :]]


def test_the_best_temperature_comes_from_a_feasible_trial_of_the_walk() -> None:
    sampler = GuidedSampler([], optuna.samplers.RandomSampler(seed=0), rank=(1, 1.0))
    study = optuna.create_study(directions=["maximize", "maximize"])
    for temperature, margin, values, violation in [
        (30.0, 0.1, [0.9, 0.9], 0.5),  # the best value, but a requirement is missed
        (3.0, 0.1, [0.9, 0.7], 0.0),
        (10.0, 0.1, [0.9, 0.6], -1.0),
        (1.0, 0.5, [0.9, 0.95], 0.0),  # another offset: not on the walk
    ]:
        trial = study.ask()
        trial.suggest_float("margin", 0.01, 5.0)
        trial.set_user_attr(
            "liptune.params", {"loss": "offset_ce", "margin": margin, "temperature": temperature}
        )
        trial.set_constraint("certified_accuracy_eps_0.1", violation)
        study.tell(trial, values)
    choice = BestOf("temperature", (("loss", "offset_ce"), ("margin", 0.1)), 100.0)
    assert sampler.best(study, choice) == 3.0


def test_without_an_eps_the_guided_ladders_start_at_their_middle() -> None:
    spec = _anchored([{"metric": "accuracy"}, {"metric": "mean_certified_radius"}])
    assert eps_anchors(spec) == {}
    sampler = build_sampler(
        spec.model_copy(update={"search_space": SearchSpace.model_validate(SPACE)}), 0
    )
    assert sampler.points == guideline_points(SearchSpace.model_validate(SPACE), 8)


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
