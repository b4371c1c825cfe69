"""Trial claims: the exact budget of a study shared by many workers, and their liveness.

Optuna's ask/tell does not bound the number of trials: two workers that both see 9 of 10 trials
done would both ask. A worker therefore first claims a slot in ``liptune_trial_claims`` (same
database as Optuna) and only then asks Optuna. Claiming is one transaction that

1. takes the study's lock: on PostgreSQL a transaction-scoped advisory lock keyed by the study
   name (like ``SELECT ... FOR UPDATE`` on a row, but without locking Optuna's ``studies`` row,
   which Optuna's own inserts of trials take a key-share lock on); on SQLite the transaction
   begins with ``BEGIN IMMEDIATE``, which serialises writers,
2. counts the study's ``running`` and ``complete`` claims,
3. inserts a ``running`` claim on the lowest free slot ``0 <= slot < n_trials``, or nothing.

A partial unique index on ``(study_name, slot)`` over non-failed claims backs the lock: even a
buggy claimer cannot hold one slot twice. A failed claim frees its slot.

The table is created by the service's Alembic history (revision ``0002`` of
:mod:`service.migrations`); :data:`claims` mirrors it for the queries.

Every running claim carries the database time of its last heartbeat; a claim without one for
the grace period belongs to a dead worker, and :func:`free_stale_claims` hands it, exactly once,
to the worker that finds it.

A conditional study (``strategy: conditional``) trains one network before its trials: the worker
that trains it holds the study's training lease, a claim on the slot :data:`TRAINING_SLOT`
(:func:`claim_training`), under the same lock, index, heartbeat and stale check as a trial's
claim. The lease is not a trial: :func:`counts` leaves it out, :func:`training_counts` counts
it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.engine import Engine

CLAIMS_TABLE = "liptune_trial_claims"


class ClaimState(StrEnum):
    """The state of a claim, stored as its value in the ``state`` column."""

    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"


# The former module-level names of the states, kept for callers outside the worker.
RUNNING, COMPLETE, FAILED = ClaimState.RUNNING, ClaimState.COMPLETE, ClaimState.FAILED

metadata = sa.MetaData()
claims = sa.Table(
    CLAIMS_TABLE,
    metadata,
    sa.Column("claim_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_name", sa.String(512), nullable=False, index=True),
    sa.Column("slot", sa.Integer, nullable=False),
    sa.Column("trial_id", sa.Integer, nullable=True),
    sa.Column("trial_number", sa.Integer, nullable=True),
    sa.Column("worker_id", sa.String(255), nullable=False),
    sa.Column(
        "state",
        # VARCHAR(16) as migrated; reads give ClaimState, writes store the value.
        sa.Enum(
            ClaimState,
            native_enum=False,
            create_constraint=False,
            length=16,
            values_callable=lambda states: [state.value for state in states],
        ),
        nullable=False,
    ),
    sa.Column("failure_reason", sa.Text, nullable=True),
    sa.Column("claimed_at", sa.DateTime, nullable=False, server_default=sa.func.now()),
    sa.Column("heartbeat_at", sa.DateTime, nullable=False, server_default=sa.func.now()),
    sa.Column("finished_at", sa.DateTime, nullable=True),
    sa.Index(
        "ix_liptune_trial_claims_live_slot",
        "study_name",
        "slot",
        unique=True,
        sqlite_where=sa.text("state != 'failed'"),
        postgresql_where=sa.text("state != 'failed'"),
    ),
)


#: The slot of a conditional study's training lease: below the trials' slots 0..n_trials-1, so
#: it never takes one of them.
TRAINING_SLOT = -1


@dataclass(frozen=True)
class Claim:
    """One worker's hold on one slot of a study's budget."""

    claim_id: int
    study_name: str
    slot: int
    worker_id: str


@dataclass(frozen=True)
class StaleClaim:
    """A running claim whose worker stopped heartbeating, now failed."""

    claim_id: int
    worker_id: str
    trial_id: int | None
    trial_number: int | None


@dataclass(frozen=True)
class ClaimCounts:
    running: int = 0
    complete: int = 0
    failed: int = 0


def _lock_study(connection: sa.Connection, study_name: str) -> None:
    """Take the study's claim lock for the transaction (PostgreSQL; SQLite's ``BEGIN
    IMMEDIATE`` serialises writers already)."""
    if connection.dialect.name == "postgresql":
        connection.execute(
            sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtextextended(study_name, 0)))
        )


def claim_slot(engine: Engine, study_name: str, *, n_trials: int, worker_id: str) -> Claim | None:
    """Claim a free slot of ``study_name``'s budget of ``n_trials``; ``None`` when every slot is
    running or complete."""
    with engine.begin() as connection:
        _lock_study(connection, study_name)
        taken = set(
            connection.execute(
                sa.select(claims.c.slot).where(
                    claims.c.study_name == study_name, claims.c.state != ClaimState.FAILED
                )
            ).scalars()
        )
        free = sorted(set(range(n_trials)) - taken)
        if not free:
            return None
        claim_id = connection.execute(
            claims.insert()
            .values(
                study_name=study_name, slot=free[0], worker_id=worker_id, state=ClaimState.RUNNING
            )
            .returning(claims.c.claim_id)
        ).scalar_one()
    return Claim(claim_id=claim_id, study_name=study_name, slot=free[0], worker_id=worker_id)


def claim_training(engine: Engine, study_name: str, *, worker_id: str) -> Claim | None:
    """Claim the training lease of a conditional study; ``None`` when a worker holds it
    (running) or it is complete (the network is trained)."""
    with engine.begin() as connection:
        _lock_study(connection, study_name)
        held = connection.execute(
            sa.select(sa.func.count()).where(
                claims.c.study_name == study_name,
                claims.c.slot == TRAINING_SLOT,
                claims.c.state != ClaimState.FAILED,
            )
        ).scalar_one()
        if held:
            return None
        claim_id = connection.execute(
            claims.insert()
            .values(
                study_name=study_name,
                slot=TRAINING_SLOT,
                worker_id=worker_id,
                state=ClaimState.RUNNING,
            )
            .returning(claims.c.claim_id)
        ).scalar_one()
    return Claim(claim_id=claim_id, study_name=study_name, slot=TRAINING_SLOT, worker_id=worker_id)


def record_trial(engine: Engine, claim: Claim, *, trial_id: int, trial_number: int) -> None:
    """Note which Optuna trial a claim runs."""
    with engine.begin() as connection:
        connection.execute(
            claims.update()
            .where(claims.c.claim_id == claim.claim_id)
            .values(trial_id=trial_id, trial_number=trial_number, heartbeat_at=sa.func.now())
        )


def heartbeat(engine: Engine, claim: Claim) -> bool:
    """Mark a claim alive; ``False`` when it is no longer running (freed as stale)."""
    with engine.begin() as connection:
        updated = connection.execute(
            claims.update()
            .where(claims.c.claim_id == claim.claim_id, claims.c.state == ClaimState.RUNNING)
            .values(heartbeat_at=sa.func.now())
        )
    return updated.rowcount == 1


def finish(
    engine: Engine, claim: Claim, state: ClaimState, failure_reason: str | None = None
) -> bool:
    """End a running claim as ``complete`` or ``failed``; ``False`` when it was no longer
    running (another worker freed it as stale)."""
    if state not in (ClaimState.COMPLETE, ClaimState.FAILED):
        raise ValueError(f"a claim finishes as 'complete' or 'failed', not {state!r}")
    with engine.begin() as connection:
        updated = connection.execute(
            claims.update()
            .where(claims.c.claim_id == claim.claim_id, claims.c.state == ClaimState.RUNNING)
            .values(state=state, failure_reason=failure_reason, finished_at=sa.func.now())
        )
    return updated.rowcount == 1


def counts(engine: Engine, study_name: str) -> ClaimCounts:
    """How many of a study's trial claims are running, complete and failed (the training lease
    of a conditional study is not one of them)."""
    return _counts(engine, study_name, claims.c.slot >= 0)


def training_counts(engine: Engine, study_name: str) -> ClaimCounts:
    """How many training leases of a conditional study are running (0 or 1), complete (0 or 1)
    and failed (dead or stopped trainers)."""
    return _counts(engine, study_name, claims.c.slot == TRAINING_SLOT)


def _counts(engine: Engine, study_name: str, where: sa.ColumnElement[bool]) -> ClaimCounts:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(claims.c.state, sa.func.count())
            .where(claims.c.study_name == study_name, where)
            .group_by(claims.c.state)
        ).all()
    return ClaimCounts(**dict(rows))


def _database_now(connection: sa.Connection) -> datetime.datetime:
    now = connection.execute(sa.select(sa.func.now())).scalar_one()
    if isinstance(now, str):  # SQLite returns CURRENT_TIMESTAMP as text
        now = datetime.datetime.fromisoformat(now)
    # Stored timestamps are naive, in the database's own clock; compare like with like.
    return now.replace(tzinfo=None)


def free_stale_claims(engine: Engine, study_name: str, grace_period: float) -> list[StaleClaim]:
    """Fail the running claims of ``study_name`` without a heartbeat for ``grace_period``
    seconds (database time); returns those this call failed, each to exactly one caller."""
    freed = []
    with engine.begin() as connection:
        cutoff = _database_now(connection) - datetime.timedelta(seconds=grace_period)
        stale = connection.execute(
            sa.select(claims).where(
                claims.c.study_name == study_name,
                claims.c.state == ClaimState.RUNNING,
                claims.c.heartbeat_at < cutoff,
            )
        ).all()
        for row in stale:
            updated = connection.execute(
                claims.update()
                .where(claims.c.claim_id == row.claim_id, claims.c.state == ClaimState.RUNNING)
                .values(
                    state=ClaimState.FAILED,
                    failure_reason=f"worker {row.worker_id} stopped heartbeating",
                    finished_at=sa.func.now(),
                )
            )
            if updated.rowcount == 1:
                freed.append(
                    StaleClaim(row.claim_id, row.worker_id, row.trial_id, row.trial_number)
                )
    return freed


def claimed_trial_ids(
    engine: Engine, study_name: str, states: tuple[ClaimState, ...] = (ClaimState.RUNNING,)
) -> set[int]:
    """Optuna trial ids of the study's claims in ``states`` (by default: running)."""
    with engine.connect() as connection:
        return set(
            connection.execute(
                sa.select(claims.c.trial_id).where(
                    claims.c.study_name == study_name,
                    claims.c.state.in_(states),
                    claims.c.trial_id.is_not(None),
                )
            ).scalars()
        )


def studies_with_running_claims(engine: Engine) -> set[str]:
    """Names of the studies that have running claims."""
    with engine.connect() as connection:
        return set(
            connection.execute(
                sa.select(claims.c.study_name)
                .where(claims.c.state == ClaimState.RUNNING)
                .distinct()
            ).scalars()
        )
