"""The typed record of one trial, and its one serialisation to Optuna trial user attributes.

The worker writes a trial's record as it runs (who runs it, each epoch, then the outcome); the
service reads it back from the frozen trial. Both go through :meth:`TrialAttributes.write` and
:meth:`TrialAttributes.read`: the attribute keys (``liptune.<field name>``) exist only here.

Stored form: one user attribute per field that differs from its default, its value JSON-ready
(the radii as :meth:`worker.trial._certificates.RadiiSummary.encode`'s string, the attack summary
as a dict).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker.trial._certificates import AttackSummary, RadiiSummary

#: Prefix of every trial user attribute of the record.
PREFIX = "liptune."


class _AttrWriter(Protocol):
    def set_user_attr(self, key: str, value: Any) -> None: ...


@dataclass
class TrialAttributes:
    """What liptune knows about one trial beyond Optuna's params, values and state.

    - ``worker``: id of the worker that ran it;
    - ``metrics``: final metrics, :func:`worker.spec.metric_key` name -> value;
    - ``epochs``: one dict per finished epoch (``epoch``, ``train_loss``, ``val_accuracy``,
      ``val_certified_accuracy_eps_{e}``, ``lr``, ``seconds``);
    - ``radii``: the test split's certificate radii (recomputes certified accuracy at any eps);
    - ``certificate_mode``: how the head's margin becomes a radius (``binary``, ``global``,
      ``classwise``);
    - ``mlflow_run_id`` and ``model_uri``, the PyTorch logged model's URI (``models:/m-ID``,
      ``ID`` being the MLflow logged model id);
    - ``failure_reason`` (one line) and ``failure_details`` (a short traceback) of a failed trial;
    - ``retry_of`` (number of the failed trial this one retries) and ``retries`` (how many
      retries led here);
    - ``pruned_at_epoch``: the epoch after which a pruner stopped it;
    - ``lipschitz_bound`` (guaranteed upper bound of the exported model) and
      ``lipschitz_estimate`` (power-iteration lower estimate);
    - ``attack``: the empirical check of the certificates (:class:`AttackSummary`).
    """

    worker: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    epochs: list[dict[str, float]] = field(default_factory=list)
    radii: RadiiSummary | None = None
    certificate_mode: str | None = None
    mlflow_run_id: str | None = None
    model_uri: str | None = None
    failure_reason: str | None = None
    failure_details: str | None = None
    retry_of: int | None = None
    retries: int = 0
    pruned_at_epoch: int | None = None
    lipschitz_bound: float | None = None
    lipschitz_estimate: float | None = None
    attack: AttackSummary | None = None

    # ------------------------------------------------------------------ serialisation

    def user_attrs(self, *names: str) -> dict[str, Any]:
        """The stored form of the fields ``names`` (default: every field not at its default)."""
        chosen = _field_names(names) if names else [n for n in _FIELDS if self._is_set(n)]
        return {key(name): _encode(name, getattr(self, name)) for name in chosen}

    def write(self, trial: _AttrWriter, *names: str) -> None:
        """Store the fields ``names`` (default: every field not at its default) on ``trial``
        (an :class:`optuna.Trial`, or anything with ``set_user_attr(key, value)``)."""
        for attr, value in self.user_attrs(*names).items():
            trial.set_user_attr(attr, value)

    @classmethod
    def read(cls, trial: Any, *names: str) -> TrialAttributes:
        """The record stored on ``trial`` (a :class:`optuna.trial.FrozenTrial`, a live trial, or
        its ``user_attrs`` mapping): the fields ``names`` (default: all; e.g. leave out
        ``radii``, the costly one to decode); absent fields keep their defaults."""
        attrs: Mapping[str, Any] = trial if isinstance(trial, Mapping) else trial.user_attrs
        values = {
            name: _decode(name, attrs[key(name)])
            for name in (_field_names(names) if names else _FIELDS)
            if attrs.get(key(name)) is not None
        }
        return cls(**values)

    def _is_set(self, name: str) -> bool:
        value = getattr(self, name)
        default = _DEFAULTS[name]
        return value != default if not isinstance(value, RadiiSummary) else True


_FIELDS = [f.name for f in dataclasses.fields(TrialAttributes)]
_DEFAULTS = {
    f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    for f in dataclasses.fields(TrialAttributes)
}


def key(name: str) -> str:
    """The user attribute that stores the field ``name`` of :class:`TrialAttributes`."""
    return PREFIX + name


def _field_names(names: tuple[str, ...]) -> list[str]:
    unknown = [name for name in names if name not in _DEFAULTS]
    if unknown:
        raise ValueError(f"TrialAttributes has no field {unknown}; fields: {_FIELDS}")
    return list(names)


def _encode(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "radii":
        return value.encode()
    if name == "attack":
        return value.to_json()
    if name == "metrics":
        return {k: float(v) for k, v in value.items()}
    if name == "epochs":
        return [dict(epoch) for epoch in value]
    return value


def _decode(name: str, value: Any) -> Any:
    if name == "radii":
        return RadiiSummary.decode(value) if value else None
    if name == "attack":
        return AttackSummary.from_json(value)
    if name == "metrics":
        return {k: float(v) for k, v in value.items()}
    if name == "epochs":
        return [dict(epoch) for epoch in value]
    if name in ("retry_of", "retries", "pruned_at_epoch"):
        return int(value)
    if name in ("lipschitz_bound", "lipschitz_estimate"):
        return float(value)
    return value
