"""The databases liptune shares between processes: a URL's installed driver, the schema lock
held while a process creates or upgrades tables, and engine settings safe for many workers.

The study store (:mod:`worker.study`), MLflow's tracking and registry stores
(:mod:`worker.tracking`) and the service's migrations all open their databases through these.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import sqlalchemy
from filelock import FileLock
from sqlalchemy.engine import make_url

#: How long a SQLite connection waits for another process's write lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 120.0
#: Key of the PostgreSQL advisory lock held while a process creates or upgrades tables.
SCHEMA_LOCK_KEY = 0x6C6970747576


def resolve_url(url: str) -> str:
    """``url`` with a database driver that is installed.

    SQLAlchemy 2.1 reads a bare ``postgresql://`` URL with psycopg 3; when only psycopg2 is
    installed, the URL is read with it instead. Any other URI (another driver, an MLflow server's
    ``http://``, ``databricks``) is returned as it is.
    """
    if not url.startswith("postgresql://") or importlib.util.find_spec("psycopg") is not None:
        return url
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_file(url: str) -> str:
    """The database file of the SQLite ``url``; ``ValueError`` for a URL that names none (an
    in-memory database, which has no file to lock beside)."""
    database = make_url(url).database
    if not database:
        raise ValueError(f"{url!r} names no SQLite database file")
    return database


def sqlite_schema_lock(path: str) -> FileLock:
    return FileLock(f"{path}.schema.lock", timeout=SQLITE_BUSY_TIMEOUT_S)


@contextlib.contextmanager
def schema_lock(url: str, key: int = SCHEMA_LOCK_KEY) -> Iterator[None]:
    """Hold the database's schema lock: one process at a time creates or upgrades tables.

    An API and its workers often start together on a fresh database; without the lock two of
    them run Optuna's ``CREATE TYPE`` / ``CREATE TABLE`` at once and one fails with a
    duplicate-key error. On PostgreSQL the lock is a session-level advisory lock (released if
    the process dies) on ``key``, on SQLite a lock file beside the database file (``ValueError``
    for a SQLite URL that names none). Not re-entrant: do not nest two locks on one key.
    """
    url = resolve_url(url)
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        with sqlite_schema_lock(sqlite_file(url)):
            yield
        return
    if backend != "postgresql":
        yield
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(f"SELECT pg_advisory_lock({key})")
            connection.commit()
            try:
                yield
            finally:
                connection.exec_driver_sql(f"SELECT pg_advisory_unlock({key})")
                connection.commit()
    finally:
        engine.dispose()


def engine_kwargs(url: str) -> dict[str, Any]:
    """``create_engine`` keyword arguments that make ``url`` safe to share between workers."""
    if is_sqlite(url):
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}}
    return {"pool_pre_ping": True}
