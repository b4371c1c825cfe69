"""liptune's studies are plain Optuna studies; this module names and annotates them.

A study with service id ``ID`` is the Optuna study ``liptune-ID`` in the shared storage, with one
direction per objective (in the order of ``spec.objectives``) and these study user attributes:

==========================  =================================================================
``liptune.id``              the service's study id (uuid4 hex)
``liptune.spec``            the :class:`~worker.spec.StudySpec` as JSON data (inf -> "Infinity")
``liptune.status``          ``running``, ``completed``, ``cancelled`` or ``failed``
``liptune.created_at``      ISO 8601, UTC
``liptune.failure_reason``  why a ``failed`` study stopped
``liptune.conditioned``     a conditional study's network: ``status`` (``training``,
                            ``pending`` after a stopped training, ``trained``, ``failed``),
                            ``epochs`` (of the current or last training), ``epochs_spent``
                            (over every training started, stopped ones included),
                            ``seconds``, ``worker``, ``mlflow_run_id``, ``failure_reason``
==========================  =================================================================

Nothing is private to liptune: ``optuna.load_study(study_name="liptune-ID", storage=URL)`` and
optuna-dashboard open the study, and the trials carry their metrics and MLflow run ids as user
attributes (:class:`worker.study._record.TrialAttributes`).
"""

from __future__ import annotations

import datetime
import json
import warnings
from enum import StrEnum
from typing import Any, Protocol

import optuna

from worker.search._samplers import build_sampler
from worker.search._space import enqueue
from worker.spec import StudySpec
from worker.study._engine import open_storage

STUDY_PREFIX = "liptune-"

ID_ATTR = "liptune.id"
SPEC_ATTR = "liptune.spec"
STATUS_ATTR = "liptune.status"
CREATED_AT_ATTR = "liptune.created_at"
FAILURE_REASON_ATTR = "liptune.failure_reason"
CONDITIONED_ATTR = "liptune.conditioned"


class StudyStatus(StrEnum):
    """The status of a study, stored as its value in the attribute ``liptune.status``."""

    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


#: The statuses' values, in order (the API's schema lists them).
STATUSES: tuple[str, ...] = tuple(status.value for status in StudyStatus)

#: Trial user attribute of an enqueued baseline: its index in ``spec.baselines``.
BASELINE_ATTR = "liptune.baseline"

Storage = str | optuna.storages.BaseStorage


class FrozenStudy(Protocol):
    """What liptune reads of a study without its trials: a :class:`optuna.Study` or the
    frozen studies ``storage.get_all_studies()`` returns (Optuna's type for those is private)."""

    @property
    def study_name(self) -> str: ...

    @property
    def user_attrs(self) -> dict[str, Any]: ...


def optuna_study_name(study_id: str) -> str:
    """The Optuna study name of the service's study ``study_id``."""
    return f"{STUDY_PREFIX}{study_id}"


def experiment_name(spec: StudySpec, study_id: str) -> str:
    """The MLflow experiment of the service's study ``study_id``: one run per trial."""
    return f"liptune/{spec.name}/{study_id}"


def _as_storage(storage: Storage) -> optuna.storages.BaseStorage:
    return open_storage(storage) if isinstance(storage, str) else storage


def create_study(storage: Storage, spec: StudySpec, study_id: str) -> optuna.Study:
    """Create the Optuna study of ``spec``, enqueue its baselines and open it to workers.

    Raises ``ValueError`` (before anything is stored) when the spec's sampler cannot search its
    space, and ``optuna.exceptions.DuplicatedStudyError`` when the study exists.
    """
    sampler = build_sampler(spec, spec.seed)
    study = optuna.create_study(
        storage=_as_storage(storage),
        study_name=optuna_study_name(study_id),
        directions=[objective.direction for objective in spec.objectives],
        sampler=sampler,
    )
    # optuna-dashboard and optuna.visualization label the axes with these.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([objective.key for objective in spec.objectives])
    study.set_user_attr(ID_ATTR, study_id)
    study.set_user_attr(SPEC_ATTR, json.loads(spec.model_dump_json()))
    study.set_user_attr(
        CREATED_AT_ATTR, datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    )
    for index, params in enumerate(spec.baselines):
        enqueue(study, params, {BASELINE_ATTR: index})
    # Last: workers take only running studies, and only a complete one may be seen running.
    study.set_user_attr(STATUS_ATTR, StudyStatus.RUNNING.value)
    return study


def load_study(
    storage: Storage, study_id: str, sampler: optuna.samplers.BaseSampler | None = None
) -> optuna.Study:
    """The Optuna study of ``study_id`` (``KeyError`` when there is none)."""
    return optuna.load_study(
        study_name=optuna_study_name(study_id), storage=_as_storage(storage), sampler=sampler
    )


def load_spec(study: FrozenStudy) -> StudySpec:
    """The spec a liptune study was created from."""
    data = study.user_attrs.get(SPEC_ATTR)
    if data is None:
        raise ValueError(f"study {study.study_name!r} is not a liptune study (no {SPEC_ATTR})")
    return StudySpec.model_validate(data)


def study_status(study: FrozenStudy) -> StudyStatus:
    """``running``, ``completed``, ``cancelled`` or ``failed``."""
    return StudyStatus(study.user_attrs[STATUS_ATTR])


def set_status(study: optuna.Study, status: StudyStatus, reason: str | None = None) -> None:
    """Set a study's status, with the ``reason`` of a failure."""
    if status not in STATUSES:
        raise ValueError(f"unknown study status {status!r}; one of {STATUSES}")
    if reason is not None:
        study.set_user_attr(FAILURE_REASON_ATTR, reason)
    study.set_user_attr(STATUS_ATTR, StudyStatus(status).value)


def cancel_study(storage: Storage, study_id: str) -> None:
    """Stop a study: no worker starts another of its trials, and running ones stop between two
    epochs and end as FAIL with the failure reason ``cancelled``."""
    set_status(load_study(storage, study_id), StudyStatus.CANCELLED)


def set_budget(storage: Storage, study_id: str, n_trials: int) -> StudySpec:
    """Set a study's budget to ``n_trials`` and open it to workers again (also a finished one);
    returns the new spec."""
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    study = load_study(storage, study_id)
    data: dict[str, Any] = study.user_attrs[SPEC_ATTR]
    spec = StudySpec.model_validate({**data, "n_trials": n_trials})
    study.set_user_attr(SPEC_ATTR, json.loads(spec.model_dump_json()))
    set_status(study, StudyStatus.RUNNING)
    return spec


def running_studies(storage: Storage) -> list[tuple[str, FrozenStudy]]:
    """``(study_id, study)`` of every running liptune study, oldest first.

    Studies come as :class:`FrozenStudy` (name, directions, user attributes):
    listing them reads no trials, so workers can poll it cheaply.
    """
    studies = _as_storage(storage).get_all_studies()
    running = [
        study
        for study in studies
        if study.study_name.startswith(STUDY_PREFIX)
        and study.user_attrs.get(STATUS_ATTR) == StudyStatus.RUNNING
    ]
    running.sort(key=lambda study: (study.user_attrs.get(CREATED_AT_ATTR, ""), study.study_name))
    return [(study.user_attrs[ID_ATTR], study) for study in running]
