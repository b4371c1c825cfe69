"""The study storage: Optuna's RDB storage, configured so that many workers can share it.

One database holds Optuna's tables (``studies``, ``trials``, ...), liptune's trial claims
(:mod:`worker.study._claims`) and the service's tables; all of liptune's are prefixed ``liptune_``.

* SQLite (the embedded default, one machine): the file is switched to WAL journal mode (readers
  never block the writer; the switch under the schema lock, see :func:`_enable_wal`) and every
  connection waits up to :data:`SQLITE_BUSY_TIMEOUT_S` for a lock instead of failing with
  "database is locked", so several local worker processes can share it.
* PostgreSQL (many machines): connections are checked before use (``pool_pre_ping``), so a
  worker survives a server restart or an idle connection dropped by a proxy.

Optuna's own heartbeat thread only runs inside ``study.optimize``; liptune's workers use ask/tell
and record heartbeats themselves (:class:`worker.loop.Heartbeat`), at ``heartbeat_interval``.
"""

from __future__ import annotations

import functools
import sqlite3
import time
import warnings
from typing import Any

import optuna
import sqlalchemy
from sqlalchemy.engine import Engine, make_url

from worker.common._databases import (
    SQLITE_BUSY_TIMEOUT_S,
    engine_kwargs,
    is_sqlite,
    resolve_url,
    schema_lock,
    sqlite_file,
    sqlite_schema_lock,
)

#: Seconds between two heartbeats of a running trial.
DEFAULT_HEARTBEAT_INTERVAL_S = 30
#: A running trial without a heartbeat for this long belongs to a dead worker.
DEFAULT_GRACE_PERIOD_S = 120


def _check_shared_url(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ValueError(
            f"storage {url!r} is an in-memory SQLite database, which no other process or "
            "connection can see; name a file, e.g. sqlite:////path/to/liptune.db"
        )


def _enable_wal(url: str) -> None:
    """Switch a SQLite file to WAL journal mode (a persistent property of the file).

    ``PRAGMA journal_mode=WAL`` reads the file under a shared lock, then needs the write lock to
    rewrite its header; while another connection holds that lock (another process switching the
    same fresh file, or writing to it before it is in WAL mode), SQLite answers "database is
    locked" at once, without waiting its busy timeout (waiting while holding the shared lock
    could deadlock). So processes starting together switch the file one at a time, under the
    schema lock, a file already in WAL mode is only read, and a switch that still meets the
    lock (a writer outside liptune's lock) is tried again until :data:`SQLITE_BUSY_TIMEOUT_S`.
    """
    path = sqlite_file(url)
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    with sqlite_schema_lock(path):
        while True:
            connection = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S)
            try:
                if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    connection.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as error:
                if "database is locked" not in str(error) or time.monotonic() > deadline:
                    raise
            finally:
                connection.close()
            time.sleep(_WAL_RETRY_S)


#: Pause between two attempts to switch a file to WAL mode that met another writer's lock.
_WAL_RETRY_S = 0.05


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cursor.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; commits skip an fsync
    cursor.close()


def open_storage(
    url: str,
    *,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL_S,
    grace_period: int = DEFAULT_GRACE_PERIOD_S,
) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on ``url`` (``sqlite:///FILE`` or ``postgresql://...``).

    ``heartbeat_interval`` and ``grace_period`` (whole seconds, Optuna's unit) are what
    ``optuna.storages.fail_stale_trials`` and the workers' stale-trial check go by.
    """
    url = resolve_url(url)
    _check_shared_url(url)
    if heartbeat_interval <= 0 or grace_period <= 0:
        raise ValueError(
            f"heartbeat_interval ({heartbeat_interval}) and grace_period ({grace_period}) "
            "must be positive whole seconds"
        )
    if grace_period <= heartbeat_interval:
        raise ValueError(
            f"grace_period ({grace_period} s) must exceed heartbeat_interval "
            f"({heartbeat_interval} s), or live trials would be failed as stale"
        )
    if is_sqlite(url):
        _enable_wal(url)
    with schema_lock(url), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs(url),
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
        )
    if is_sqlite(url):
        sqlalchemy.event.listen(storage.engine, "connect", _set_sqlite_pragmas)
        storage.engine.dispose()  # connections opened during set-up lack the pragmas
    return storage


def _begin_immediate(connection: sqlalchemy.Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _disable_pysqlite_transactions(dbapi_connection: Any, record: Any) -> None:
    # pysqlite would issue BEGIN itself, lazily, only before the first write; the engine's
    # "begin" listener issues BEGIN IMMEDIATE instead, so reads inside a transaction are
    # protected by the write lock too.
    dbapi_connection.isolation_level = None
    _set_sqlite_pragmas(dbapi_connection, record)


@functools.cache
def transaction_engine(url: str) -> Engine:
    """An SQLAlchemy engine on ``url`` for liptune's own tables, one per URL and process.

    Every transaction on it is serialised against other writers: on SQLite it starts with
    ``BEGIN IMMEDIATE`` (the write lock is taken before the first read); on PostgreSQL rows are
    locked with ``SELECT ... FOR UPDATE`` by the caller.
    """
    _check_shared_url(url)
    if is_sqlite(url):
        _enable_wal(url)
        engine = sqlalchemy.create_engine(url, **engine_kwargs(url))
        sqlalchemy.event.listen(engine, "connect", _disable_pysqlite_transactions)
        sqlalchemy.event.listen(engine, "begin", _begin_immediate)
        return engine
    return sqlalchemy.create_engine(url, pool_size=2, max_overflow=2, **engine_kwargs(url))


def storage_url(storage: optuna.storages.BaseStorage | str) -> str:
    """The URL of a storage (or the URL itself), with the password kept."""
    if isinstance(storage, str):
        return storage
    if isinstance(storage, optuna.storages.RDBStorage):
        return storage.url
    raise TypeError(
        f"liptune needs an RDB storage (SQLite or PostgreSQL URL), got {type(storage).__name__}"
    )
