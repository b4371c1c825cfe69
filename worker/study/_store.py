"""The study store: the one adapter between liptune and the databases its studies live in.

It owns the Optuna RDB storage, the claims engine (:mod:`worker.study._claims`) on the same
database, and every call into another library's private API (kept here, each with why no public API
serves). The worker loop writes through it; the service's cache, results, health and routers
read through it. Its URL is resolved once (:func:`worker.study._engine.resolve_url`), so the Optuna
storage and the claims engine always use the same installed driver.

Each storage operation of the worker loop is one method (:meth:`claim`, :meth:`attach`,
:meth:`heartbeat`, :meth:`finish_claim`, :meth:`tell`, :meth:`fail`, :meth:`study_status`, ...),
marked :func:`worker.common._retry.retried`, so a retry policy
(:func:`worker.common._retry.retrying`) runs each one on its own.

Why not Optuna's ``fail_stale_trials`` with ``RetryFailedTrialCallback``: the budget is held by
the claims, not by Optuna's trials. ``fail_stale_trials`` fails a trial from its Optuna
heartbeat alone, in another transaction than the one that frees its claim: a trial could be
failed while its slot still counts (the budget stalls), or its slot freed while a slow worker
still tells it (the budget is exceeded). The callback also re-enqueues with Optuna's own
retry bookkeeping, which cannot carry the parameters a trial ran with outside the searched
space (enqueued baselines) nor stop at ``spec.max_retries``. So stale trials are found by their
claims (:meth:`free_stale_claims`), failed and re-enqueued by the worker loop.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from worker.common._databases import resolve_url
from worker.common._retry import RetryPolicy, retried
from worker.search._space import enqueue, suggest_params
from worker.spec import SearchSpace
from worker.study import _claims as claims
from worker.study._claims import Claim, ClaimCounts, ClaimState, StaleClaim
from worker.study._engine import (
    DEFAULT_GRACE_PERIOD_S,
    DEFAULT_HEARTBEAT_INTERVAL_S,
    open_storage,
    transaction_engine,
)
from worker.study._record import TrialAttributes
from worker.study._studies import (
    CONDITIONED_ATTR,
    ID_ATTR,
    STATUS_ATTR,
    STUDY_PREFIX,
    FrozenStudy,
    StudyStatus,
    optuna_study_name,
    running_studies,
    set_status,
)


class SchemaMissing(RuntimeError):
    """liptune's tables are not in the database yet (run the migrations first)."""


class StudyStore:
    """Optuna's storage and liptune's claims on one database URL (``sqlite:///FILE`` or
    ``postgresql://...``, any driver spelling).

    ``heartbeat_interval`` and ``grace_period`` (whole seconds) configure Optuna's heartbeat
    (what ``optuna.storages.fail_stale_trials`` would go by) and the claims' liveness.
    """

    def __init__(
        self,
        url: str,
        *,
        heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL_S,
        grace_period: int = DEFAULT_GRACE_PERIOD_S,
    ) -> None:
        self.url = resolve_url(url)
        self.storage = open_storage(
            self.url, heartbeat_interval=heartbeat_interval, grace_period=grace_period
        )
        self.engine = transaction_engine(self.url)
        #: Set by :func:`worker.common._retry.retrying` (the worker loop's store rides out outages).
        self.retry_policy: RetryPolicy | None = None

    @retried
    def require_schema(self) -> None:
        """Raise :class:`SchemaMissing` unless the claims table exists (the service's Alembic
        history creates it: ``liptune worker``, ``liptune serve`` and the API migrate at start)."""
        if not sa.inspect(self.engine).has_table(claims.CLAIMS_TABLE):
            raise SchemaMissing(
                f"the database {self.engine.url.render_as_string()} has no "
                f"{claims.CLAIMS_TABLE} table: start the worker with `liptune worker` (which "
                "migrates it) or run service.migrations.upgrade(URL) first"
            )

    # ------------------------------------------------------------------ studies

    @retried
    def load_study(
        self, study_name: str, sampler: optuna.samplers.BaseSampler | None = None
    ) -> optuna.Study:
        return optuna.load_study(study_name=study_name, storage=self.storage, sampler=sampler)

    @retried
    def running_studies(self) -> list[tuple[str, FrozenStudy]]:
        """``(study_id, frozen study)`` of every running liptune study, oldest first."""
        return running_studies(self.storage)

    @retried
    def liptune_studies(self) -> list[Any]:
        """Every liptune study, as Optuna's frozen studies (no trials read)."""
        return [
            study
            for study in self.storage.get_all_studies()
            if study.study_name.startswith(STUDY_PREFIX) and ID_ATTR in study.user_attrs
        ]

    @retried
    def optuna_study_id(self, study_id: str) -> int:
        """Optuna's id of the service's study ``study_id``; ``KeyError`` when there is none."""
        return self.storage.get_study_id_from_name(optuna_study_name(study_id))

    @retried
    def study_status(self, study_name: str) -> StudyStatus:
        """The status of a study (one read of its user attributes): the status poll."""
        study_id = self.storage.get_study_id_from_name(study_name)
        return StudyStatus(self.storage.get_study_user_attrs(study_id).get(STATUS_ATTR, "running"))

    @retried
    def study_status_by_id(self, optuna_study_id: int) -> StudyStatus:
        attrs = self.storage.get_study_user_attrs(optuna_study_id)
        return StudyStatus(attrs.get(STATUS_ATTR, "running"))

    @retried
    def conditioned_network(self, study_name: str) -> dict[str, Any]:
        """A conditional study's network record (:data:`worker.study._studies.CONDITIONED_ATTR`;
        empty before its training started)."""
        study_id = self.storage.get_study_id_from_name(study_name)
        return dict(self.storage.get_study_user_attrs(study_id).get(CONDITIONED_ATTR) or {})

    @retried
    def set_conditioned_network(self, study_name: str, record: dict[str, Any]) -> None:
        study_id = self.storage.get_study_id_from_name(study_name)
        self.storage.set_study_user_attr(study_id, CONDITIONED_ATTR, record)

    @retried
    def study_state_by_id(self, optuna_study_id: int) -> tuple[StudyStatus, dict[str, Any]]:
        """A study's status and its conditioned network's record (empty for a ``train`` study),
        in one read of its user attributes."""
        attrs = self.storage.get_study_user_attrs(optuna_study_id)
        status = StudyStatus(attrs.get(STATUS_ATTR, "running"))
        return status, dict(attrs.get(CONDITIONED_ATTR) or {})

    @staticmethod
    def frozen_study_id(frozen_study: Any) -> int:
        # Private: FrozenStudy exposes its storage id only as ``_study_id``; the public
        # get_study_id_from_name would cost one query per study at every metrics scrape.
        return frozen_study._study_id

    # ------------------------------------------------------------------ claims

    @retried
    def claim(self, study_name: str, *, n_trials: int, worker_id: str) -> Claim | None:
        """Claim a free slot of the study's budget; ``None`` when none is free."""
        return claims.claim_slot(self.engine, study_name, n_trials=n_trials, worker_id=worker_id)

    @retried
    def claim_training(self, study_name: str, *, worker_id: str) -> Claim | None:
        """Claim a conditional study's training lease; ``None`` when another worker holds it or
        the network is trained (:func:`worker.study._claims.claim_training`)."""
        return claims.claim_training(self.engine, study_name, worker_id=worker_id)

    @retried
    def training_counts(self, study_name: str) -> ClaimCounts:
        return claims.training_counts(self.engine, study_name)

    @retried
    def attach(self, claim: Claim, trial: optuna.Trial | FrozenTrial) -> int:
        """Note which Optuna trial ``claim`` runs and record its first heartbeat; returns the
        trial's storage id."""
        trial_id = self.trial_id(trial)
        claims.record_trial(self.engine, claim, trial_id=trial_id, trial_number=trial.number)
        self.storage.record_heartbeat(trial_id)
        return trial_id

    @retried
    def heartbeat(self, claim: Claim, trial_id: int | None) -> bool:
        """Mark the claim (and its trial, once attached) alive; ``False`` when the claim was
        freed as stale by another worker."""
        alive = claims.heartbeat(self.engine, claim)
        if trial_id is not None:
            self.storage.record_heartbeat(trial_id)
        return alive

    @retried
    def finish_claim(
        self, claim: Claim, state: ClaimState, failure_reason: str | None = None
    ) -> bool:
        return claims.finish(self.engine, claim, state, failure_reason)

    @retried
    def claim_counts(self, study_name: str) -> ClaimCounts:
        return claims.counts(self.engine, study_name)

    @retried
    def free_stale_claims(self, study_name: str, grace_period: float) -> list[StaleClaim]:
        return claims.free_stale_claims(self.engine, study_name, grace_period)

    @retried
    def claimed_trial_ids(
        self, study_name: str, states: tuple[ClaimState, ...] = (ClaimState.RUNNING,)
    ) -> set[int]:
        return claims.claimed_trial_ids(self.engine, study_name, states)

    @retried
    def studies_with_running_claims(self) -> set[str]:
        return claims.studies_with_running_claims(self.engine)

    @retried
    def heartbeat_ages(self) -> list[tuple[str, float]]:
        """``(worker id, seconds since its last heartbeat)`` of each worker with a running
        claim, in database time; empty before any worker ran."""
        if not sa.inspect(self.engine).has_table(claims.CLAIMS_TABLE):
            return []
        table = claims.claims
        with self.engine.connect() as connection:
            now = _as_datetime(connection.execute(sa.select(sa.func.now())).scalar_one())
            rows = connection.execute(
                sa.select(table.c.worker_id, sa.func.max(table.c.heartbeat_at))
                .where(table.c.state == ClaimState.RUNNING)
                .group_by(table.c.worker_id)
            ).all()
        return [
            (worker_id, max(0.0, (now - _as_datetime(beat)).total_seconds()))
            for worker_id, beat in rows
        ]

    # ------------------------------------------------------------------ trials

    @staticmethod
    def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
        # Private: Optuna's storage API names trials by id, its public trials only by number;
        # get_trial_id_from_study_id_trial_number would cost a query per trial.
        return trial._trial_id

    @retried
    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self.storage.get_trial(trial_id)

    @retried
    def write_record(self, trial_id: int, record: TrialAttributes, *names: str) -> None:
        """Store fields of ``record`` (:meth:`TrialAttributes.write`) on the trial ``trial_id``."""
        for key, value in record.user_attrs(*names).items():
            self.storage.set_trial_user_attr(trial_id, key, value)

    @retried
    def ask(self, study: optuna.Study) -> optuna.Trial:
        """A new RUNNING trial of ``study`` (an enqueued one first), sampled by its sampler.

        Retried after an outage, a trial Optuna created before the connection dropped stays
        RUNNING with no claim: the workers' orphan check fails it after a grace period."""
        with warnings.catch_warnings():
            # Optuna's heartbeat thread runs only in optimize(); the worker heartbeats itself.
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            return study.ask()

    @retried
    def suggest(self, trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
        """The trial's parameters from ``space`` (:func:`suggest_params`). Retried, the parameters
        already written come back as they were (Optuna returns a trial's known parameter)."""
        return suggest_params(trial, space)

    @retried
    def report(self, trial: optuna.Trial, value: float, step: int) -> None:
        """Optuna's intermediate value of ``trial`` at ``step`` (what optuna-dashboard draws)."""
        trial.report(value, step=step)

    @retried
    def set_constraint(self, trial: optuna.Trial, key: str, value: float) -> None:
        """A requirement's violation (feasible when <= 0), recorded before the tell."""
        trial.set_constraint(key, value)

    @retried
    def enqueue(
        self, study: optuna.Study, params: dict[str, Any], user_attrs: dict[str, Any]
    ) -> None:
        """A trial with fixed ``params`` waiting in ``study`` (see :func:`enqueue`)."""
        enqueue(study, params, user_attrs)

    @retried
    def set_status(
        self, study: optuna.Study, status: StudyStatus, reason: str | None = None
    ) -> None:
        """Set a study's status (and the ``reason`` of a failure)."""
        set_status(study, status, reason)

    @retried
    def tell(self, study: optuna.Study, trial: optuna.Trial, values: Sequence[float]) -> bool:
        """Complete ``trial`` with ``values``; ``False`` when another worker finished it."""
        try:
            study.tell(trial, list(values))
        except UpdateFinishedTrialError:
            return False
        return True

    @retried
    def prune(self, study: optuna.Study, trial: optuna.Trial, record: TrialAttributes) -> bool:
        """Store ``record``'s set fields (its epochs, ``pruned_at_epoch``) and end ``trial`` as
        PRUNED (Optuna 5 takes no values for a pruned trial: they live in the record);
        ``False`` when it was already finished."""
        return _end(study, trial, record, TrialState.PRUNED)

    @retried
    def epoch_records(self, study: optuna.Study) -> list[tuple[int, list[dict[str, Any]]]]:
        """``(trial number, stored epoch records)`` of every trial of ``study`` as committed,
        whatever its state: what a pruner ranks a rung against. Optuna's cached storage reads
        only the trials not yet finished again."""
        return [
            (trial.number, TrialAttributes.read(trial).epochs)
            for trial in study.get_trials(deepcopy=False)
        ]

    @retried
    def fail(self, study: optuna.Study, trial: optuna.Trial, record: TrialAttributes) -> bool:
        """Store ``record``'s set fields (the failure reason) and end ``trial`` as FAIL;
        ``False`` when it was already finished."""
        return _end(study, trial, record, TrialState.FAIL)

    @retried
    def fail_trial_id(self, trial_id: int, record: TrialAttributes) -> bool:
        """Fail another worker's RUNNING trial by id, storing ``record``'s set fields first;
        ``False`` when it is not running any more."""
        if self.storage.get_trial(trial_id).state != TrialState.RUNNING:
            return False
        try:
            self.write_record(trial_id, record)
            return bool(self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL))
        except UpdateFinishedTrialError:
            return False

    @retried
    def running_trial_ids(self, study: optuna.Study) -> dict[int, FrozenTrial]:
        """The study's RUNNING trials by storage id."""
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return {self.trial_id(trial): trial for trial in running}

    @retried
    def trials_since(
        self, optuna_study_id: int, trial_ids: Iterable[int], max_trial_id: int
    ) -> list[tuple[int, FrozenTrial]]:
        """``(trial id, trial)`` of the trials ``trial_ids`` and of every trial with an id above
        ``max_trial_id``: one query.

        Private: Optuna's incremental read (``RDBStorage._get_trials``, which its own
        ``_CachedStorage`` uses); the public ``get_all_trials`` re-reads every trial, about a
        second per thousand.
        """
        fresh = self.storage._get_trials(
            optuna_study_id,
            states=None,
            included_trial_ids=set(trial_ids),
            trial_id_greater_than=max_trial_id,
        )
        return [(self.trial_id(trial), trial) for trial in fresh]

    @retried
    def trial_state_counts(self, optuna_study_ids: Iterable[int]) -> list[tuple[int, str, int]]:
        """``(optuna study id, state name, count)`` over the given studies: one grouped query.

        Private: Optuna's ORM models; the public ``get_n_trials`` is one query per study and
        state at every metrics scrape.
        """
        from optuna.storages._rdb.models import TrialModel

        ids = list(optuna_study_ids)
        with self.storage.scoped_session() as session:
            rows = session.execute(
                sa.select(TrialModel.study_id, TrialModel.state, sa.func.count())
                .where(TrialModel.study_id.in_(ids))
                .group_by(TrialModel.study_id, TrialModel.state)
            ).all()
        # The WHERE clause matches only trials of the given studies: study_id is never NULL.
        return [
            (study_id, state.name, count) for study_id, state, count in rows if study_id is not None
        ]


def _as_datetime(value: datetime | str) -> datetime:
    """A database time as a naive datetime in the database's clock (SQLite returns text)."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=None)


def _end(
    study: optuna.Study, trial: optuna.Trial, record: TrialAttributes, state: TrialState
) -> bool:
    """Write ``record``'s set fields, then end ``trial`` in ``state`` (no values); ``False`` when
    it was already finished."""
    try:
        record.write(trial)
        study.tell(trial, state=state)
    except UpdateFinishedTrialError:
        return False
    return True
