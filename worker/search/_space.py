"""The conditional search space of a study: a loss family, then only that family's parameters.

For a :class:`~worker.spec.SearchSpace` the Optuna parameters of one trial are

* ``loss``: ``suggest_categorical`` among the families (not suggested when there is one);
* for each parameter the chosen family reads (:data:`~worker.spec.FAMILY_PARAMS`):

  - a :class:`~worker.spec.Range` -> ``suggest_float(name, low, high, log=log)``,
  - a list of two or more values -> ``suggest_categorical(name, values)`` (``alpha_kr`` may
    hold ``inf``),
  - a fixed value (or a one-value list) -> not suggested, passed to the trial as is,
  - absent -> not suggested, :data:`~worker.spec.PARAM_DEFAULTS`;

* ``conv`` when the space names convolution families (``SearchSpace.conv``):
  ``suggest_categorical`` among them (passed as is when there is one); without it the trial
  uses the model's own ``conv`` and has no ``conv`` parameter.

Every value the trial trains with, suggested or not, is recorded in the trial's user attribute
:data:`PARAMS_ATTR`, so the front shows the whole loss configuration of every trial.

An enqueued trial (a baseline, a retry) fixes some parameters in advance; a baseline's family may
lie outside the searched ones (e.g. the guideline's "cosine loss first"), and a baseline's value
of a parameter the study does not search replaces the fixed value or default.
"""

from __future__ import annotations

from typing import Any

import optuna

from worker.spec import FAMILY_PARAMS, PARAM_DEFAULTS, Range, SearchSpace

#: Trial user attribute: every loss parameter the trial ran with, suggested or not.
PARAMS_ATTR = "liptune.params"
#: Trial user attribute of an enqueued trial: the parameters fixed in advance.
ENQUEUED_ATTR = "liptune.enqueued_params"
#: The parameters whose values are names, not numbers.
_CATEGORIES = ("loss", "conv")


def enqueue(
    study: optuna.Study, params: dict[str, Any], user_attrs: dict[str, Any] | None = None
) -> None:
    """Enqueue a trial whose ``params`` (``loss``, some of its parameters, maybe ``conv``) are
    fixed."""
    params = {k: v if k in _CATEGORIES else float(v) for k, v in params.items() if v is not None}
    study.enqueue_trial(params, user_attrs={ENQUEUED_ATTR: params, **(user_attrs or {})})


def _searched(values: Any) -> bool:
    return isinstance(values, Range) or (isinstance(values, list) and len(values) > 1)


def _within(values: Range | list[float], value: Any) -> bool:
    if isinstance(values, Range):
        return values.low <= float(value) <= values.high
    return float(value) in values


def suggest_params(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """Suggest one trial's loss parameters (and conv family); returns all of them, e.g.
    ``{"loss": "hkr", "margin": 0.3, "alpha_kr": 120.0}`` (only the family's parameters), with
    ``"conv": "aol"`` when the space searches convolution families.

    Optuna keeps one distribution per parameter for the whole study, so an enqueued value that
    lies outside the searched space (a baseline's other family, a value off the list) is passed
    to the trial without being suggested.
    """
    enqueued = trial.user_attrs.get(ENQUEUED_ATTR, {})
    families = space.families
    if "loss" in enqueued and enqueued["loss"] not in families:
        family = enqueued["loss"]
    elif len(families) > 1:
        family = trial.suggest_categorical("loss", families)
    else:
        family = families[0]
    params: dict[str, Any] = {"loss": family}
    for name in FAMILY_PARAMS[family]:
        values = getattr(space, name)
        if name in enqueued and not (_searched(values) and _within(values, enqueued[name])):
            params[name] = float(enqueued[name])
        elif isinstance(values, Range):
            params[name] = trial.suggest_float(name, values.low, values.high, log=values.log)
        elif _searched(values):
            params[name] = trial.suggest_categorical(name, values)
        elif isinstance(values, list):
            params[name] = values[0]
        else:
            params[name] = PARAM_DEFAULTS[name] if values is None else values
    if space.conv is not None:
        if enqueued.get("conv") in space.conv:
            params["conv"] = enqueued["conv"]
        elif len(space.conv) > 1:
            params["conv"] = trial.suggest_categorical("conv", space.conv)
        else:
            params["conv"] = space.conv[0]
    trial.set_user_attr(PARAMS_ATTR, params)
    return params


def trial_params(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The loss parameters a finished or running trial trained with (see :data:`PARAMS_ATTR`)."""
    return dict(trial.user_attrs.get(PARAMS_ATTR, trial.params))


def grid(space: SearchSpace) -> dict[str, list[Any]]:
    """The grid of :class:`optuna.samplers.GridSampler` over ``space``.

    A grid needs one loss family (a product grid over several families would repeat every
    configuration once per value of the other families' parameters) and a list or a fixed value
    for each of its searched parameters; searched convolution families multiply the grid.
    """
    if len(space.families) > 1:
        raise ValueError(
            f"the grid sampler searches one loss family, the search space names "
            f"{space.families}; submit one study per family, or use another sampler"
        )
    family = space.families[0]
    search: dict[str, list[Any]] = {}
    for name in FAMILY_PARAMS[family]:
        values = getattr(space, name)
        if isinstance(values, Range):
            raise ValueError(
                f"the grid sampler needs a list of values for {name}, got the range "
                f"[{values.low}, {values.high}]; give the values, e.g. [0.1, 0.5, 1.0]"
            )
        if isinstance(values, list) and len(values) > 1:
            search[name] = list(values)
    if space.conv is not None and len(space.conv) > 1:
        search["conv"] = list(space.conv)
    if not search:
        raise ValueError(
            f"the grid sampler needs at least one parameter of {family!r} (or `conv`) with a "
            "list of values"
        )
    return search
