"""Alembic environment: online migrations only, on the URL :func:`alembic_config` sets."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from service.db import Base
from service.migrations import VERSION_TABLE
from worker.common import engine_kwargs

config = context.config
url = config.get_main_option("sqlalchemy.url")
# SQLite: wait for another process's write lock as every liptune connection does (not 5 s).
engine = create_engine(url, poolclass=pool.NullPool, **engine_kwargs(url))

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
