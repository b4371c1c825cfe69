"""Alembic migrations of liptune's tables (the service's studies and the workers' trial claims);
:func:`upgrade` runs them to the head. The API, ``liptune serve`` and ``liptune worker`` run it at
start.

The version table is ``liptune_alembic_version``: Optuna keeps its own ``alembic_version`` in
the same database. Several processes may start at once: the upgrade holds the database's
schema lock (:func:`worker.study._engine.schema_lock`), so exactly one of them migrates and the
others find the schema current.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from worker.common import resolve_url, schema_lock

VERSION_TABLE = "liptune_alembic_version"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.set_main_option("sqlalchemy.url", resolve_url(url).replace("%", "%%"))
    return config


def upgrade(url: str) -> None:
    """Bring the service's tables on ``url`` to the latest revision."""
    with schema_lock(url):
        command.upgrade(alembic_config(url), "head")
