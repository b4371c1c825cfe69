"""Per-study snapshots that keep the reads fast with thousands of trials.

Reading every trial of a study from Optuna's RDB storage takes about a second per thousand
trials. A finished trial never changes, so a :class:`StudySnapshot` keeps the records (and the
decoded radii) of finished trials for good and, on refresh, asks the storage only for the
trials it has not seen finish: the ones that were unfinished and the new ones (one query,
:meth:`worker.study._store.StudyStore.trials_since`). A snapshot older than the TTL
is refreshed by the next read; while one thread refreshes, other readers keep answering from
the previous snapshot. Derived results (the front at an eps, the study summary) are memoised
per snapshot version.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from optuna.trial import FrozenTrial
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import results
from service.db import StudyRow
from service.schemas import TrialRecord
from worker.spec import StudySpec
from worker.study import StudyStatus, StudyStore
from worker.trial import RadiiSummary

#: Derived results kept per snapshot (e.g. fronts at this many distinct eps).
MAX_DERIVED = 64


class UnknownStudy(LookupError):
    """No study with this id (or its Optuna study is not created yet)."""


@dataclass
class StudySnapshot:
    """What the API knows of one study at ``refreshed_at`` (monotonic seconds)."""

    id: str
    name: str
    spec: StudySpec
    spec_data: dict[str, Any]
    n_trials: int
    created_at: datetime
    status: StudyStatus
    records: list[TrialRecord]
    radii: dict[int, RadiiSummary | None]
    trials: dict[int, FrozenTrial]
    version: int
    refreshed_at: float
    #: A conditional study's network record (``liptune.conditioned``); empty otherwise.
    conditioned: dict[str, Any] = field(default_factory=dict)
    derived: OrderedDict[Any, Any] = field(default_factory=OrderedDict)
    derived_lock: threading.Lock = field(default_factory=threading.Lock)

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per snapshot and ``key``."""
        with self.derived_lock:
            if key in self.derived:
                return self.derived[key]
        value = compute()
        with self.derived_lock:
            self.derived[key] = value
            while len(self.derived) > MAX_DERIVED:
                self.derived.popitem(last=False)
        return value


@dataclass
class _StudyState:
    """The refresh state of one study: finished trials by trial id, the rest to re-read."""

    optuna_study_id: int
    finished: dict[int, tuple[FrozenTrial, TrialRecord, RadiiSummary | None]]
    unfinished: dict[int, tuple[FrozenTrial, TrialRecord]]
    max_trial_id: int
    lock: threading.Lock
    snapshot: StudySnapshot | None = None


class StudyCache:
    """Snapshots of studies from the service table (``liptune_studies``) and the study store."""

    def __init__(self, store: StudyStore, sessions: sessionmaker[Session], ttl_s: float) -> None:
        self.store = store
        self.sessions = sessions
        self.ttl_s = ttl_s
        self._states: dict[str, _StudyState] = {}
        self._states_lock = threading.Lock()

    def snapshot(self, study_id: str) -> StudySnapshot:
        """The study's snapshot, refreshed when older than the TTL; raises :class:`UnknownStudy`."""
        state = self._state(study_id)
        current = state.snapshot
        if current is not None and time.monotonic() - current.refreshed_at < self.ttl_s:
            return current
        # Readers that find a refresh under way answer from the previous snapshot.
        if current is not None and not state.lock.acquire(blocking=False):
            return current
        if current is None:
            state.lock.acquire()
        try:
            if state.snapshot is not current and state.snapshot is not None:
                return state.snapshot
            state.snapshot = self._refresh(study_id, state)
            return state.snapshot
        finally:
            state.lock.release()

    def peek(self, study_id: str) -> StudySnapshot | None:
        """The snapshot if it can be answered without reading the database (fresh, or being
        refreshed by another reader), else ``None``: then call :meth:`snapshot`."""
        state = self._states.get(study_id)
        current = state.snapshot if state is not None else None
        if current is None:
            return None
        if time.monotonic() - current.refreshed_at < self.ttl_s or state.lock.locked():
            return current
        return None

    def invalidate(self, study_id: str) -> None:
        """Make the next read refresh (after a write: cancel, extend)."""
        state = self._states.get(study_id)
        if state is not None and state.snapshot is not None:
            state.snapshot.refreshed_at = float("-inf")

    def _state(self, study_id: str) -> _StudyState:
        state = self._states.get(study_id)
        if state is not None:
            return state
        try:
            optuna_id = self.store.optuna_study_id(study_id)
        except KeyError:
            raise UnknownStudy(study_id) from None
        with self._states_lock:
            return self._states.setdefault(
                study_id,
                _StudyState(optuna_id, {}, {}, -1, threading.Lock()),
            )

    def _refresh(self, study_id: str, state: _StudyState) -> StudySnapshot:
        with self.sessions() as session:
            row = session.scalars(select(StudyRow).where(StudyRow.id == study_id)).one_or_none()
            if row is None:
                raise UnknownStudy(study_id)
            name, spec_data, n_trials, created_at = (
                row.name,
                row.spec,
                row.n_trials,
                row.created_at,
            )
        previous = state.snapshot
        spec = previous.spec if previous is not None else StudySpec.model_validate(spec_data)
        status, conditioned = self.store.study_state_by_id(state.optuna_study_id)
        # The trials not seen finished, and every newer one.
        fresh = self.store.trials_since(state.optuna_study_id, state.unfinished, state.max_trial_id)
        changed = False
        for trial_id, trial in fresh:
            state.max_trial_id = max(state.max_trial_id, trial_id)
            known = state.unfinished.get(trial_id)
            if known is not None and _same(known[0], trial):
                continue
            changed = True
            record = results.trial_record(trial, spec)
            if trial.state.is_finished():
                state.unfinished.pop(trial_id, None)
                state.finished[trial_id] = (trial, record, results.trial_radii(trial))
            else:
                state.unfinished[trial_id] = (trial, record)
        unchanged = (
            previous is not None
            and not changed
            and (previous.status, previous.n_trials, previous.conditioned)
            == (status, n_trials, conditioned)
        )
        if unchanged:
            previous.refreshed_at = time.monotonic()
            return previous
        if fresh:
            # Finished trials live as long as the process: out of the cyclic collector's sight,
            # full collections stay short (they were the latency tail with thousands of trials).
            gc.freeze()
        entries = [(t, r, radii) for t, r, radii in state.finished.values()]
        entries += [(t, r, None) for t, r in state.unfinished.values()]
        entries.sort(key=lambda entry: entry[0].number)
        return StudySnapshot(
            id=study_id,
            name=name,
            spec=StudySpec.model_validate({**spec_data, "n_trials": n_trials}),
            spec_data={**spec_data, "n_trials": n_trials},
            n_trials=n_trials,
            created_at=created_at,
            status=status,
            records=[record for _, record, _ in entries],
            radii={trial.number: radii for trial, _, radii in entries},
            trials={trial.number: trial for trial, _, _ in entries},
            version=(previous.version + 1) if previous is not None else 0,
            refreshed_at=time.monotonic(),
            conditioned=conditioned,
        )


def _same(old: FrozenTrial, new: FrozenTrial) -> bool:
    return (
        old.state == new.state
        and old.params == new.params
        and old.user_attrs == new.user_attrs
        and old.datetime_start == new.datetime_start
    )
