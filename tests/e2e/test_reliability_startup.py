"""Processes starting together on fresh local stores: every one of them comes up.

Real processes (spawned interpreters), released together by a barrier once each has imported
its libraries, on fresh files, several rounds each: the study store (SQLite: the WAL switch,
Optuna's tables, the service's migrations) and the embedded MLflow store (its tables and Alembic
history). Each process then writes, and the final counts are exact.
"""

from __future__ import annotations

import functools
import multiprocessing
import sqlite3
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

PROCESSES = 6
#: Fresh study stores each process opens, one per round (MLflow's store costs more: 1 round).
ROUNDS = 3


def _run_rounds(
    work: Any,
    args: tuple[Any, ...],
    processes: int,
    rounds: int,
    during_first_round: Any = None,
) -> list[str]:
    """Run ``work(index, round, *args)`` in ``processes`` spawned interpreters, started
    together for every round once all are ready (``during_first_round(start)`` runs in a
    thread of this process with the first round's start time); the tracebacks of the calls
    that raised."""
    context = multiprocessing.get_context("spawn")
    start = context.Value("d", 0.0)
    barrier = context.Barrier(processes, action=functools.partial(_set_start, start))
    outcomes = context.Queue()
    workers = [
        context.Process(target=_rounds, args=(work, index, barrier, start, outcomes, args, rounds))
        for index in range(processes)
    ]
    for process in workers:
        process.start()
    if during_first_round is not None:

        def first_round() -> None:
            while start.value == 0.0:
                time.sleep(0.01)
            during_first_round(start.value)

        threading.Thread(target=first_round, daemon=True).start()
    found = [outcomes.get(timeout=180) for _ in range(processes * rounds)]
    for process in workers:
        process.join(timeout=60)
    assert [process.exitcode for process in workers] == [0] * processes
    return [error for error in found if error is not None]


def _set_start(start: Any) -> None:
    start.value = time.time() + 0.5


def _rounds(
    work: Any,
    index: int,
    barrier: Any,
    start: Any,
    outcomes: Any,
    args: tuple[Any, ...],
    rounds: int,
) -> None:
    for round_ in range(rounds):
        barrier.wait(timeout=120)
        # A barrier wakes its parties one after another; a shared instant starts them together.
        time.sleep(max(0.0, start.value - time.time()))
        try:
            work(index, round_, *args)
        except Exception:
            outcomes.put(traceback.format_exc())
        else:
            outcomes.put(None)


def _open_study_store(index: int, round_: int, folder: str) -> None:
    from service.migrations import upgrade
    from worker.study._store import StudyStore

    url = f"sqlite:///{folder}/round-{round_}.db"
    store = StudyStore(url)
    upgrade(url)
    store.require_schema()
    study = optuna.create_study(study_name=f"process-{index}", storage=store.storage)
    study.tell(study.ask(), 1.0)


def test_processes_starting_together_on_a_fresh_sqlite_store_all_come_up(
    tmp_path: Path,
) -> None:
    """``PRAGMA journal_mode=WAL`` fails at once, whatever the busy timeout, while another
    connection holds the fresh file's write lock: in the first round this test holds it for a
    second from the start (as a process switching the file, or writing it, does), and every
    process failed with "database is locked" until the switch waited; the other rounds are
    the processes alone."""
    first = tmp_path / "round-0.db"
    writer = sqlite3.connect(first, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")

    def release_the_write_lock(start: float) -> None:
        time.sleep(max(0.0, start + 1.0 - time.time()))
        writer.execute("COMMIT")

    errors = _run_rounds(
        _open_study_store, (str(tmp_path),), PROCESSES, ROUNDS, release_the_write_lock
    )
    writer.close()
    assert errors == []
    for round_ in range(ROUNDS):
        url = f"sqlite:///{tmp_path}/round-{round_}.db"
        storage = optuna.storages.RDBStorage(url)
        studies = storage.get_all_studies()
        assert sorted(study.study_name for study in studies) == [
            f"process-{index}" for index in range(PROCESSES)
        ]
        for study in studies:
            trials = storage.get_all_trials(study._study_id)
            assert [trial.state for trial in trials] == [TrialState.COMPLETE]
        engine = sa.create_engine(url)
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
            assert (
                connection.exec_driver_sql(
                    "SELECT count(*) FROM liptune_alembic_version"
                ).scalar_one()
                == 1
            )
        engine.dispose()


def _log_a_run(index: int, round_: int, tracking_uri: str, artifact_root: str) -> None:
    from worker.tracking import _mlflow as tracking

    config = tracking.TrackingConfig(tracking_uri, Path(artifact_root))
    run_id = tracking.start_run(
        config, experiment="startup", run_name=f"process-{index}", params={}, tags={}
    )
    tracking.end_run(config, run_id, "FINISHED")


def _assert_every_process_logged_its_run(tracking_uri: str, processes: int) -> None:
    from mlflow import MlflowClient

    from worker.common._databases import resolve_url

    client = MlflowClient(resolve_url(tracking_uri))
    experiment = client.get_experiment_by_name("startup")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_name for run in runs) == [f"process-{i}" for i in range(processes)]
    assert {run.info.status for run in runs} == {"FINISHED"}


def test_workers_starting_together_on_a_fresh_local_mlflow_store_all_log_their_runs(
    tmp_path: Path,
) -> None:
    """MLflow creates a fresh database's schema unlocked: without the lock in
    :func:`worker.tracking._mlflow._client`, most processes failed with "duplicate column name"."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    errors = _run_rounds(_log_a_run, (uri, str(tmp_path / "artifacts")), 4, 1)
    assert errors == []
    _assert_every_process_logged_its_run(uri, 4)


@pytest.mark.postgres
def test_workers_starting_together_on_a_fresh_postgresql_mlflow_store_all_log_their_runs(
    postgres_url: str, tmp_path: Path
) -> None:
    """A shared MLflow database on PostgreSQL, named with a bare ``postgresql://`` URL as the
    study store is: without the advisory lock three of the four processes failed creating MLflow's
    tables (and without the driver resolution, every one failed importing psycopg 3)."""
    bare = postgres_url.replace("postgresql+psycopg2://", "postgresql://")
    errors = _run_rounds(_log_a_run, (bare, str(tmp_path / "artifacts")), 4, 1)
    assert errors == []
    _assert_every_process_logged_its_run(bare, 4)
