"""Alembic environment: online migrations only, on the URL :func:`alembic_config` sets."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from service.db import Base
from service.migrations import VERSION_TABLE

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
        context.run_migrations()
engine.dispose()
