"""Alembic migrations of the service's tables; :func:`upgrade` runs them to the head.

The version table is ``liptune_alembic_version``: Optuna keeps its own ``alembic_version`` in
the same database. Several processes may start at once: on PostgreSQL the upgrade holds a
transaction-level advisory lock, on SQLite a lock file beside the database, so exactly one of
them migrates and the others find the schema current.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from filelock import FileLock
from sqlalchemy.engine import make_url

VERSION_TABLE = "liptune_alembic_version"
#: Key of the PostgreSQL advisory lock taken during the upgrade (any constant shared by all).
ADVISORY_LOCK_KEY = 0x6C6970747576


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str) -> None:
    """Bring the service's tables on ``url`` to the latest revision."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        with FileLock(f"{parsed.database}.migrate.lock", timeout=120):
            command.upgrade(alembic_config(url), "head")
    else:
        command.upgrade(alembic_config(url), "head")
