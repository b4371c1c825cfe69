"""Study writes: submit (idempotent), cancel and extend.

Two stores hold a study: the service's row (:class:`service.db.StudyRow`: the submitted spec,
its budget, the ``Idempotency-Key`` and the hash of the body it came with) and the Optuna study
the workers read (spec, status, trials). These functions keep them in step; the routers only
check the caller and shape the responses.

- :func:`submit` records the row first, so that a retry of a recorded key is answered from the
  row without joining the write queue, then creates the Optuna study (a row whose creation
  failed is removed again). One submission per process waits for the database's write lock,
  holding no pooled connection while it waits.
- :func:`extend` raises the row's budget with one atomic ``UPDATE``, then sets (never adds to)
  the Optuna study's budget from the row's total, again until the two agree: concurrent extends
  all count, whichever finishes last writes the final total.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from service.cache import StudyCache, StudySnapshot, UnknownStudy
from service.db import StudyRow
from service.dependencies import Resources
from service.problems import Problem, field_error, invalid_input
from worker.spec import StudySpec
from worker.study import StudyStatus, cancel_study, create_study, set_budget

#: How long a replayed submission waits for the first request to create the Optuna study.
REPLAY_WAIT_S = 30.0

#: One writer of submission rows per process: SQLite has one writer anyway, and a submission
#: waiting for the write lock waits here, holding no pooled connection.
_INSERT_LOCK = threading.Lock()


@dataclass(frozen=True)
class Submission:
    """A submitted study: its id, and whether a recorded ``Idempotency-Key`` answered it."""

    study_id: str
    replayed: bool


def submit(resources: Resources, spec: StudySpec, idempotency_key: str | None) -> Submission:
    """Store ``spec`` as a new study, or answer a retry of ``idempotency_key`` with the study it
    created (422 when the key came with another body)."""
    spec_json = spec.model_dump_json()
    request_hash = hashlib.sha256(spec_json.encode()).hexdigest()
    if idempotency_key is not None:
        existing = _recorded(resources, idempotency_key)
        if existing is not None:  # a retry: answered from the record, no write
            return _replayed(existing, request_hash)
    study_id = uuid.uuid4().hex
    row = StudyRow(
        id=study_id,
        name=spec.name,
        spec=json.loads(spec_json),
        n_trials=spec.n_trials,
        created_at=datetime.now(UTC),
        idempotency_key=idempotency_key,
        request_hash=request_hash if idempotency_key is not None else None,
    )
    winner = _insert(resources, row)
    if winner is not None:  # the same key, submitted concurrently, won the race
        return _replayed(winner, request_hash)
    try:
        create_study(resources.storage, spec, study_id)
    except ValueError as error:
        _forget(resources, study_id)
        raise invalid_input([field_error("body.sampler", str(error))]) from None
    except BaseException:
        _forget(resources, study_id)
        raise
    return Submission(study_id, replayed=False)


def created_snapshot(cache: StudyCache, study_id: str) -> StudySnapshot:
    """The snapshot of a study whose row exists, waiting while the request that inserted it is
    still creating its Optuna study (503 with ``Retry-After`` after :data:`REPLAY_WAIT_S`)."""
    deadline = time.monotonic() + REPLAY_WAIT_S
    while True:
        try:
            return cache.snapshot(study_id)
        except UnknownStudy:
            if time.monotonic() > deadline:
                raise Problem(
                    503,
                    "study-being-created",
                    "the first request with this Idempotency-Key is still creating the study",
                    headers={"Retry-After": "5"},
                ) from None
            time.sleep(0.05)


def cancel(resources: Resources, snapshot: StudySnapshot) -> None:
    """Stop a running study (409 for any other): no trial starts, running ones stop."""
    if snapshot.status != StudyStatus.RUNNING:
        raise Problem(409, "study-not-running", f"the study is {snapshot.status}, not running")
    cancel_study(resources.storage, snapshot.id)
    resources.cache.invalidate(snapshot.id)


def extend(resources: Resources, snapshot: StudySnapshot, n_trials: int) -> None:
    """Add ``n_trials`` to a study's budget (422 past the server's ``max_trials``) and open it to
    workers again, also when it had finished."""
    limit = resources.settings.max_trials
    with resources.sessions() as db:
        total = db.execute(
            update(StudyRow)
            .where(StudyRow.id == snapshot.id, StudyRow.n_trials + n_trials <= limit)
            .values(n_trials=StudyRow.n_trials + n_trials)
            .returning(StudyRow.n_trials)
        ).scalar_one_or_none()
        db.commit()
        if total is None:
            raise invalid_input(
                [
                    field_error(
                        "body.n_trials",
                        f"{snapshot.n_trials} + {n_trials} trials exceed this server's "
                        f"limit of {limit}",
                        "limit",
                    )
                ]
            )
        while True:
            spec = set_budget(resources.storage, snapshot.id, total)
            current = db.scalars(select(StudyRow.n_trials).where(StudyRow.id == snapshot.id)).one()
            if current == total:
                break
            total = current
        db.execute(
            update(StudyRow)
            .where(StudyRow.id == snapshot.id, StudyRow.n_trials == total)
            .values(spec=_json_spec(spec))
        )
        db.commit()
    resources.cache.invalidate(snapshot.id)


def _replayed(row: StudyRow, request_hash: str) -> Submission:
    if row.request_hash != request_hash:
        raise Problem(
            422,
            "idempotency-key-reused",
            "this Idempotency-Key was used for a different request body; use a new key for a "
            "new study",
            errors=[field_error("header.Idempotency-Key", "already used for another body")],
        )
    return Submission(row.id, replayed=True)


def _recorded(resources: Resources, idempotency_key: str) -> StudyRow | None:
    """The study row recorded under ``idempotency_key``: one read, the connection returned to
    the pool before anything waits."""
    with resources.sessions() as db:
        return db.scalars(
            select(StudyRow).where(StudyRow.idempotency_key == idempotency_key)
        ).one_or_none()


def _insert(resources: Resources, row: StudyRow) -> StudyRow | None:
    """Store ``row``; ``None``, or the row of a concurrent submission that recorded the same
    idempotency key first. A connection is checked out only once this request may write."""
    with _INSERT_LOCK:
        if row.idempotency_key is not None:
            existing = _recorded(resources, row.idempotency_key)
            if existing is not None:
                return existing
        with resources.sessions() as db:
            db.add(row)
            try:
                db.commit()
            except IntegrityError:  # another API process recorded the key first
                db.rollback()
            else:
                return None
    assert row.idempotency_key is not None
    existing = _recorded(resources, row.idempotency_key)
    if existing is None:  # the other request recorded the key, then failed and forgot it
        raise Problem(
            503,
            "study-being-created",
            "another request with this Idempotency-Key was creating the study and gave up; "
            "retry after the delay in Retry-After",
            headers={"Retry-After": "1"},
        )
    return existing


def _json_spec(spec: StudySpec) -> dict[str, Any]:
    """The spec as JSON data, with inf written ``"Infinity"`` as in Optuna's user attributes."""
    return json.loads(spec.model_dump_json())


def _forget(resources: Resources, study_id: str) -> None:
    with resources.sessions() as db:
        row = db.get(StudyRow, study_id)
        if row is not None:
            db.delete(row)
            db.commit()
