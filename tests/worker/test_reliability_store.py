"""Store outages: the API while its PostgreSQL is down answers 503 with Retry-After
(problem+json), never a 500, and is itself again once the database is back; a real
`liptune worker` whose PostgreSQL restarts mid-study rides it out and completes the budget
exactly.

The local cluster is really stopped (``pg_ctlcluster``) for a few seconds; the test waits until
it accepts connections again before it ends, whatever happens.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import psycopg2
import pytest
import sqlalchemy as sa

from tests.conftest import POSTGRES_SERVER_URL
from tests.service.test_api_studies import DIGITS_SPEC, make_client

pytestmark = pytest.mark.postgres
CLUSTER = ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main"]


def postgres_accepts() -> bool:
    try:
        with psycopg2.connect("host=127.0.0.1 user=postgres dbname=postgres", connect_timeout=2):
            return True
    except psycopg2.OperationalError:
        return False


def wait_for_postgres(timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not postgres_accepts():
        if time.monotonic() > deadline:
            raise AssertionError("PostgreSQL did not come back")
        time.sleep(0.5)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database whose admin engine survives the restart (pre-ping)."""
    name = f"liptune_rel_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(
        f"{POSTGRES_SERVER_URL}/postgres", isolation_level="AUTOCOMMIT", pool_pre_ping=True
    )
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES_SERVER_URL}/{name}"
    finally:
        wait_for_postgres()
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def postgres_down() -> Iterator[None]:
    """While the test body runs under ``with``, PostgreSQL is stopped; then started again."""

    class Outage:
        def __enter__(self) -> None:
            subprocess.run([*CLUSTER, "stop", "-m", "fast"], check=True, timeout=60)

        def __exit__(self, *exc: object) -> None:
            subprocess.run([*CLUSTER, "start"], check=True, timeout=60)
            wait_for_postgres()

    try:
        yield Outage()
    finally:
        if not postgres_accepts():
            subprocess.run([*CLUSTER, "start"], check=False, timeout=60)
            wait_for_postgres()


def test_the_api_answers_503_while_postgres_is_down(
    tmp_path: Path, postgres_url: str, postgres_down
):
    client = make_client(tmp_path, postgres_url)
    created = client.post("/studies", json=DIGITS_SPEC)
    assert created.status_code == 201, created.text
    study_id = created.json()["id"]
    with postgres_down:
        for method, path, body in [
            ("GET", "/studies", None),
            ("GET", f"/studies/{study_id}/trials", None),
            ("POST", "/studies", {**DIGITS_SPEC, "name": "during-outage"}),
            ("POST", f"/studies/{study_id}/extend", {"n_trials": 1}),
            ("GET", "/ready", None),
        ]:
            started = time.monotonic()
            response = client.request(method, path, json=body)
            assert response.status_code == 503, (path, response.status_code, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            assert int(response.headers["retry-after"]) > 0
            assert "postgresql://" not in response.text
            assert time.monotonic() - started < 10
    back = client.get(f"/studies/{study_id}")
    if back.status_code == 503:  # the pool's first connection after the restart was stale
        back = client.get(f"/studies/{study_id}")
    assert back.status_code == 200, back.text
    assert back.json()["n_trials"] == DIGITS_SPEC["n_trials"]
    listed = client.get("/studies").json()["items"]
    assert [study["id"] for study in listed] == [study_id]


def test_a_worker_rides_out_a_postgres_restart_mid_study(
    postgres_url: str, tiny_study_spec, worker_processes, postgres_down
):
    from optuna.trial import TrialState

    from tests.worker.test_workers import claim_rows, new_study, trials_in

    n_trials = 3
    spec = tiny_study_spec(n_trials=n_trials, training={"epochs": 3, "batch_size": 64, "lr": 0.01})
    study_id, study = new_study(postgres_url, spec)
    process = worker_processes.start(
        postgres_url, "--once", "--mlflow", "none", "--heartbeat-interval", "1"
    )
    deadline = time.monotonic() + 120
    while not trials_in(study, TrialState.RUNNING):
        assert process.poll() is None, worker_processes.log("w0")
        assert time.monotonic() < deadline, "no trial started"
        time.sleep(0.2)
    with postgres_down:  # a restart that lasts: heartbeats and the tell meet the outage
        time.sleep(6)
    assert process.wait(timeout=300) == 0, worker_processes.log("w0")
    log = worker_processes.log("w0")
    assert "store unreachable" in log, log[-3000:]
    # A fresh storage: this process's pooled connections died with the restart.
    study = optuna.load_study(study_name=study.study_name, storage=postgres_url)
    complete = trials_in(study, TrialState.COMPLETE)
    assert len(complete) == n_trials, log[-3000:]
    assert study.user_attrs["liptune.status"] == "completed"
    rows = claim_rows(postgres_url, study_id)
    assert sorted(row.trial_number for row in rows if row.state == "complete") == sorted(
        t.number for t in complete
    )


class BriefOutage:
    """PostgreSQL stopped now (``pg_ctlcluster stop``, blocking) and started again in a thread
    ``seconds`` later; :meth:`join` waits until it accepts connections again."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def __call__(self, seconds: float) -> None:
        subprocess.run([*CLUSTER, "stop", "-m", "fast"], check=True, timeout=60)

        def restart() -> None:
            time.sleep(seconds)
            subprocess.run([*CLUSTER, "start"], check=True, timeout=60)

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=120)
        wait_for_postgres()


def test_an_outage_at_the_ask_and_at_an_epoch_record_is_ridden_out(
    postgres_url: str, tiny_study_spec, monkeypatch, caplog
):
    """PostgreSQL stopped right before ``study.ask()`` of the first trial and right before the
    first epoch's record is written (the hooks only time the outage; the calls are the worker's
    own): both wait for the store and the study completes with no failed trial. Before they
    went through the retrying store, the first failed the claim (``ask failed``) and the second
    crashed the trial (FAIL)."""
    from optuna.trial import TrialState

    from tests.worker.test_workers import claim_rows, new_study, trials_in
    from worker import loop as pool
    from worker.loop import Worker, WorkerOptions

    n_trials = 2
    spec = tiny_study_spec(n_trials=n_trials, training={"epochs": 2, "batch_size": 64, "lr": 0.01})
    study_id, study = new_study(postgres_url, spec)
    outage = BriefOutage()
    asks: list[int] = []

    class OutageBeforeAsk(pool.Heartbeat):
        def __enter__(self) -> pool.Heartbeat:
            entered = super().__enter__()
            if not asks:  # the worker's next storage call is the ask
                asks.append(1)
                outage(3.0)
            return entered

    original_run_trial = pool.run_trial

    def outage_before_the_first_epoch_record(*args, on_epoch, **kwargs):
        def on_epoch_after_an_outage(record):
            if record["epoch"] == 1 and len(asks) == 1:
                asks.append(2)
                outage(3.0)
            on_epoch(record)

        return original_run_trial(*args, on_epoch=on_epoch_after_an_outage, **kwargs)

    monkeypatch.setattr(pool, "Heartbeat", OutageBeforeAsk)
    monkeypatch.setattr(pool, "run_trial", outage_before_the_first_epoch_record)
    worker = Worker(
        WorkerOptions(
            storage_url=postgres_url, threads=1, device="cpu", exit_when_idle=True, max_trials=4
        )
    )
    try:
        with caplog.at_level(logging.WARNING, logger="liptune.worker"):
            assert worker.run() == n_trials
    finally:
        outage.join()
    assert asks == [1, 2]  # both outages happened
    retried = {
        record.args[0] for record in caplog.records if "store unreachable" in record.getMessage()
    }
    assert {"ask", "write_record"} <= retried, retried
    study = optuna.load_study(study_name=study.study_name, storage=postgres_url)
    assert trials_in(study, TrialState.FAIL) == []
    complete = trials_in(study, TrialState.COMPLETE)
    assert len(complete) == n_trials == len(study.trials)
    assert all(len(trial.user_attrs["liptune.epochs"]) == 2 for trial in complete)
    rows = claim_rows(postgres_url, study_id)
    assert sorted(row.state for row in rows) == ["complete"] * n_trials
