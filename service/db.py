"""The service's own tables (prefixed ``liptune_``, beside Optuna's in the same database).

``liptune_studies`` holds what a client submitted: the validated spec, its budget, and the
``Idempotency-Key`` with the SHA-256 of the request body, so that a retried ``POST /studies``
returns the study it created the first time. Live state (status, trials) stays in Optuna.
The schema is created by the Alembic migrations in :mod:`service.migrations`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class StudyRow(Base):
    """One submitted study; its id (uuid4 hex) names the Optuna study ``liptune-{id}``."""

    __tablename__ = "liptune_studies"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    n_trials: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    request_hash: Mapped[str | None] = mapped_column(String(64))
