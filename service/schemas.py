"""Request and response bodies of the API (the persistence models are in :mod:`service.db`).

Floats may be infinite (``alpha_kr = inf`` means hinge only): they are written as the strings
``"Infinity"``/``"-Infinity"`` (see :class:`service.app.InfJSONResponse`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Generic, Literal, TypeVar

import fastapi_pagination
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import to_json

from worker.study import STATUSES

#: Trial states as the API names them, in display order.
TRIAL_STATES = ("COMPLETE", "RUNNING", "WAITING", "FAIL", "PRUNED")

TrialStateName = Literal[TRIAL_STATES]  # type: ignore[valid-type]
StudyStatusName = Literal[STATUSES]  # type: ignore[valid-type]
Number = float | Literal["Infinity", "-Infinity", "NaN"]


def render_json(content: Any) -> bytes:
    """JSON bytes with non-finite floats as the strings ``"Infinity"``, ``"-Infinity"``,
    ``"NaN"``."""
    return to_json(content, inf_nan_mode="strings")


class InfJSONResponse(JSONResponse):
    """JSON with non-finite floats as the strings ``"Infinity"``, ``"-Infinity"``, ``"NaN"``
    (Starlette's JSONResponse refuses them). Routes return it with their view dicts, already in
    the shape of their ``response_model``, so no second validation pass runs."""

    def render(self, content: Any) -> bytes:
        return render_json(content)


class _Schema(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings")


Item = TypeVar("Item")


class Page(fastapi_pagination.Page[Item], Generic[Item]):
    """fastapi-pagination's page (``items``, ``total``, ``page``, ``size``, ``pages``), with
    infinite floats written as strings like every other response."""

    model_config = ConfigDict(ser_json_inf_nan="strings")


class Problem(_Schema):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, str]] | None = Field(
        default=None, description="Field errors: `{field, reason, type}`."
    )


class AttackCheck(_Schema):
    """The check of a trial's certificates by a minimal-norm L2 attack on correct test points."""

    points: int = Field(description="Correctly classified test points attacked.")
    violations: int = Field(
        description="Points with an adversarial example closer than their certified radius: "
        "broken certificates, must be 0."
    )
    tightness_median: float | None = Field(
        description="Median of certified radius / adversarial distance (1 = tight)."
    )
    tightness_p10: float | None
    tightness_p90: float | None


class AttackResult(AttackCheck):
    trial: int
    pairs: list[tuple[float, float | None]] = Field(
        description="(certified radius, adversarial distance) of each attacked point."
    )


class TrialRecord(_Schema):
    """One trial as the service sees it: the one typed, frozen view that results, pages and
    responses share, built once per trial by :func:`service.results.trial_record`."""

    model_config = ConfigDict(ser_json_inf_nan="strings", frozen=True)

    number: int
    state: TrialStateName
    params: dict[str, str | Number | None] = Field(
        description="`loss` and the family's `margin`, `alpha_kr`, `temperature`."
    )
    values: dict[str, Number] | None = Field(description="Objective key -> value (COMPLETE).")
    metrics: dict[str, Number]
    feasible: bool | None
    failure_reason: str | None
    mlflow_run_id: str | None
    model_uri: str | None
    started_at: str | None
    completed_at: str | None
    duration_s: float | None
    retry_of: int | None
    epochs_trained: int = Field(description="Epochs the trial trained so far.")
    pruned_at_epoch: int | None = Field(
        description="PRUNED trials: the epoch after which the pruner stopped it."
    )
    values_reached: dict[str, Number] | None = Field(
        description="PRUNED trials: validation metrics at that epoch, by metric key."
    )
    attack: AttackCheck | None = Field(
        default=None, description="COMPLETE trials: the attack check of the certificates."
    )
    certificate_violations: int | None = Field(
        default=None,
        description="The attack's violations; > 0 flags certificates the attack broke.",
    )

    def value(self, key: str) -> float | None:
        """The trial's value of ``key``: its objective value, else its final metric; ``None``
        when it has neither or it is NaN."""
        value = (self.values or {}).get(key, self.metrics.get(key))
        return None if value is None or math.isnan(value) else float(value)


class TrialDetail(TrialRecord):
    epochs: list[dict[str, Any]] = Field(description="Per-epoch training log.")
    attack_pairs: list[tuple[float, float | None]] = Field(
        default_factory=list,
        description="(certified radius, adversarial distance) of each attacked point; "
        "distance null where no adversarial example was found.",
    )
    certificate_mode: str | None
    worker: str | None


class ObjectiveOut(_Schema):
    key: str
    metric: str
    eps: float | None
    direction: Literal["maximize", "minimize"]


class BestValue(_Schema):
    value: Number
    trial: int


class StudyUrls(_Schema):
    self: str
    trials: str
    pareto: str
    dashboard: str


class StudySummary(_Schema):
    id: str
    name: str
    dataset: str
    model: str
    status: StudyStatusName
    n_trials: int
    counts: dict[str, int]
    best: dict[str, BestValue]
    created_at: str
    urls: StudyUrls


class ConditionedNetworkOut(_Schema):
    """The one network of a conditional study (``strategy: conditional``)."""

    status: Literal["waiting", "training", "pending", "trained", "failed"] = Field(
        description="`waiting`: no worker started it; `training`; `pending`: a training was "
        "stopped and waits for a worker; `trained`: every trial evaluates it; `failed`."
    )
    epochs: int = Field(description="Epochs of the current (or finished) training.")
    epochs_total: int = Field(description="The training's budget: the spec's training.epochs.")
    seconds: float | None = Field(default=None, description="Training seconds, once trained.")
    worker: str | None = Field(default=None, description="The worker that trains or trained it.")
    mlflow_run_id: str | None = Field(
        default=None, description="The MLflow run that holds it (tag liptune.conditional_training)."
    )
    failure_reason: str | None = None


class StudyDetail(StudySummary):
    spec: dict[str, Any]
    objectives: list[ObjectiveOut]
    requirements: list[dict[str, Any]]
    hypervolume: float | None = Field(
        description="Hypervolume of the feasible front; reference point: 0 for accuracies "
        "and radii, the slowest completed trial for training_time."
    )
    eta_seconds: float | None = Field(description="Estimated seconds until the budget is met.")
    epochs: dict[str, int] = Field(
        description="`spent`: epochs trained by the study's trials; `saved`: epochs its pruned "
        "trials did not train."
    )
    epochs_spent: int = Field(
        description="Every epoch the study trained: its trials' (strategy `train`), or its "
        "conditioned network's, stopped trainings included (strategy `conditional`, whose "
        "trials train none)."
    )
    conditioned_network: ConditionedNetworkOut | None = Field(
        default=None, description="A conditional study's one network; null for `train`."
    )
    class_names: list[str] | None = Field(
        default=None,
        description="The classes the study's models tell apart, label k named by entry k (a "
        "folder's sub-folder names, an .npz's or a plugin's class_names); null when the data "
        "set cannot be read here.",
    )


class ParetoFront(_Schema):
    eps: float | None = Field(description="The eps of a recomputed front; null: the objectives'.")
    objectives: list[ObjectiveOut]
    trials: list[TrialRecord] = Field(description="Non-dominated, sorted by the first objective.")


class Recommendation(_Schema):
    strategy: Literal["requirement", "knee"]
    eps: float | None
    objectives: list[ObjectiveOut]
    trial: TrialRecord


class ExtendRequest(_Schema):
    model_config = ConfigDict(extra="forbid")

    n_trials: int = Field(ge=1, description="Trials to add to the budget.")


# Matched with fullmatch: `$` alone would let a trailing newline through.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/ ]{0,255}")
_ALIAS = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,254}")


class RegisterRequest(_Schema):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Registered model name, e.g. `digits-robust`.")
    aliases: list[str] = Field(default_factory=list, max_length=16)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not _MODEL_NAME.fullmatch(name):
            raise ValueError(
                "a model name starts with a letter or digit and holds letters, digits, "
                "`_`, `-`, `.`, `/` or spaces (at most 256 characters)"
            )
        return name

    @field_validator("aliases")
    @classmethod
    def _valid_aliases(cls, aliases: list[str]) -> list[str]:
        for alias in aliases:
            if not _ALIAS.fullmatch(alias) or alias == "latest" or re.fullmatch(r"[vV]\d+", alias):
                raise ValueError(
                    f"alias {alias!r}: an alias starts with a letter or `_`, holds letters, "
                    "digits, `_` or `-`, and is neither `latest` nor a version like `v3`"
                )
        if len(set(aliases)) != len(aliases):
            raise ValueError("aliases must be distinct")
        return aliases


class Registered(_Schema):
    model_uri: str = Field(description="Load with `mlflow.pytorch.load_model(model_uri)`.")
    name: str
    aliases: list[str]
    trial: int


class Health(_Schema):
    status: Literal["ok"]


class Readiness(_Schema):
    status: Literal["ready"]
    checks: dict[str, str]
