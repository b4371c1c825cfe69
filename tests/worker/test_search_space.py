"""The conditional search space: a loss family, then only that family's parameters."""

from __future__ import annotations

import math

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.search._space import PARAMS_ATTR, enqueue, grid, suggest_params, trial_params
from worker.spec import FAMILY_PARAMS, LOSS_FAMILIES, PARAM_DEFAULTS, Range, SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)

POSITIVE = st.floats(min_value=0.01, max_value=100.0, allow_nan=False)


@st.composite
def param_spaces(draw: st.DrawFn, param: str) -> object:
    kind = draw(st.sampled_from(["absent", "range", "log_range", "list", "fixed"]))
    if kind == "absent":
        return None
    if kind in ("range", "log_range"):
        low = draw(POSITIVE)
        high = draw(st.floats(min_value=low * 1.01 + 0.01, max_value=1000.0))
        return {"low": low, "high": high, "log": kind == "log_range"}
    if kind == "list":
        values = draw(st.lists(POSITIVE, min_size=1, max_size=4, unique=True))
        if param == "alpha_kr" and draw(st.booleans()):
            values.append(math.inf)
        return values
    return draw(POSITIVE)


@st.composite
def search_spaces(draw: st.DrawFn) -> SearchSpace:
    families = draw(st.lists(st.sampled_from(LOSS_FAMILIES), min_size=1, max_size=4, unique=True))
    used = {param for family in families for param in FAMILY_PARAMS[family]}
    fields = {param: draw(param_spaces(param)) for param in sorted(used)}
    return SearchSpace(loss=families, **fields)


def _contains(space: object, value: float) -> bool:
    if space is None:
        return False
    if isinstance(space, Range):
        return space.low <= value <= space.high
    if isinstance(space, list):
        return value in space
    return value == space


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(space=search_spaces(), sampler=st.sampled_from(["random", "tpe"]), seed=st.integers(0, 99))
def test_only_the_chosen_family_parameters_are_suggested(
    space: SearchSpace, sampler: str, seed: int
) -> None:
    samplers = {
        "random": optuna.samplers.RandomSampler(seed=seed),
        "tpe": optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, n_startup_trials=3
        ),
    }
    study = optuna.create_study(sampler=samplers[sampler])
    for _ in range(8):
        trial = study.ask()
        params = suggest_params(trial, space)
        family = params["loss"]
        assert family in space.families
        assert set(params) == {"loss", *FAMILY_PARAMS[family]}
        assert set(trial.params) <= {"loss", *FAMILY_PARAMS[family]}
        assert ("loss" in trial.params) == (len(space.families) > 1)
        for name in FAMILY_PARAMS[family]:
            searched = getattr(space, name)
            if searched is None:
                assert params[name] == PARAM_DEFAULTS[name]
            else:
                assert _contains(searched, params[name])
            is_choice = isinstance(searched, Range) or (
                isinstance(searched, list) and len(searched) > 1
            )
            assert (name in trial.params) == is_choice
        assert trial.user_attrs[PARAMS_ATTR] == params
        study.tell(trial, float(len(trial.params)))


def test_baselines_outside_the_space_are_passed_without_being_suggested() -> None:
    space = SearchSpace(
        loss=["hkr", "tau_ce"],
        margin={"low": 0.1, "high": 1.0},
        alpha_kr=[10.0, 100.0],
        temperature=5.0,
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    enqueue(study, {"loss": "cosine"})
    enqueue(study, {"loss": "hkr", "margin": 0.5, "alpha_kr": math.inf})
    enqueue(study, {"loss": "tau_ce", "temperature": 20.0})

    cosine, hkr, tau_ce = (study.ask() for _ in range(3))
    assert suggest_params(cosine, space) == {"loss": "cosine"}
    assert cosine.params == {}
    assert suggest_params(hkr, space) == {"loss": "hkr", "margin": 0.5, "alpha_kr": math.inf}
    assert hkr.params == {"loss": "hkr", "margin": 0.5}  # inf is not among the choices
    assert suggest_params(tau_ce, space) == {"loss": "tau_ce", "temperature": 20.0}
    assert trial_params(study.trials[2]) == {"loss": "tau_ce", "temperature": 20.0}


def test_grid_needs_lists_and_one_family() -> None:
    assert grid(SearchSpace(loss="hkr", margin=[0.1, 0.5], alpha_kr=[1.0, math.inf])) == {
        "margin": [0.1, 0.5],
        "alpha_kr": [1.0, math.inf],
    }
    assert grid(SearchSpace(loss="hkr", margin=0.3, alpha_kr=[1.0, 5.0])) == {
        "alpha_kr": [1.0, 5.0]
    }
    with pytest.raises(ValueError, match="one loss family"):
        grid(SearchSpace(loss=["hkr", "tau_ce"], margin=[0.1, 0.5]))
    with pytest.raises(ValueError, match="list of values for margin"):
        grid(SearchSpace(loss="hkr", margin={"low": 0.1, "high": 1.0}))
    with pytest.raises(ValueError, match="at least one parameter"):
        grid(SearchSpace(loss="kr"))
