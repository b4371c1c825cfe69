"""Alembic environment: online migrations only, on the URL :func:`alembic_config` sets."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from service.db import Base
from service.migrations import ADVISORY_LOCK_KEY, VERSION_TABLE

config = context.config
engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        include_name=lambda name, type_, _parent: type_ != "table" or name.startswith("liptune_"),
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY}
            )
        context.run_migrations()
engine.dispose()
