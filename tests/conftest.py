"""Shared fixtures: study storages (SQLite, PostgreSQL), a tiny study spec, worker processes.

PostgreSQL tests use the server at 127.0.0.1:5432 (user ``postgres``, trust authentication);
each gets a fresh database, dropped afterwards. When the server is down they fail and say how to
start it: they never skip silently.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
POSTGRES_SERVER_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432"
POSTGRES_START_HINT = "pg_ctlcluster --skip-systemctl-redirect 15 main start"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default=None,
        help="torch's default device for the run (e.g. cuda): tensors and modules the tests "
        "create without naming a device land there (scripts/gpu-check.sh runs the core's "
        "tests so)",
    )


def pytest_configure(config: pytest.Config) -> None:
    device = config.getoption("--device")
    if device:
        import torch

        torch.set_default_device(device)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread and seed 0 for the test (the core's tests compare numbers, and two
    threads on a 2-core machine shared with worker processes only add noise)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mlflow_store() -> Callable[[str], AbstractContextManager[None]]:
    """``with mlflow_store(uri):`` points MLflow's fluent API (``mlflow.pytorch.load_model``,
    ``models:/`` URIs) at ``uri`` for the block only, as a user's ``mlflow.set_tracking_uri``
    would, without leaking a process-wide URI into the tests that run after."""
    from worker.tracking._mlflow import using_tracking_uri

    return using_tracking_uri


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite storage file in the test's own directory."""
    return f"sqlite:///{tmp_path / 'liptune.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database, dropped after the test."""
    import sqlalchemy as sa

    name = f"liptune_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(f"{POSTGRES_SERVER_URL}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as error:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_SERVER_URL} ({error.orig}); "
            f"start it with `{POSTGRES_START_HINT}`",
            pytrace=False,
        )
    try:
        yield f"{POSTGRES_SERVER_URL}/{name}"
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def storage_url(request: pytest.FixtureRequest) -> str:
    """The study storage, once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def tiny_study_spec() -> Callable[..., Any]:
    """A factory of small digits studies (1 epoch, a 16-unit MLP): ``tiny_study_spec(n_trials=3,
    search_space={...})``; keyword arguments replace the spec's fields."""
    from worker.spec import StudySpec

    def build(**overrides: Any) -> StudySpec:
        fields: dict[str, Any] = {
            "name": "tiny",
            "dataset": {"name": "digits"},
            "model": {"name": "mlp", "widths": [16]},
            "training": {"epochs": 1, "batch_size": 64, "lr": 0.01, "device": "cpu"},
            "search_space": {
                "loss": ["hkr", "tau_ce"],
                "margin": {"low": 0.05, "high": 1.0, "log": True},
                "alpha_kr": {"low": 1.0, "high": 100.0, "log": True},
                "temperature": {"low": 1.0, "high": 50.0, "log": True},
            },
            "objectives": [
                {"metric": "accuracy"},
                {"metric": "certified_accuracy", "eps": 0.1},
            ],
            "eps": [0.1],
            "n_trials": 4,
            "seed": 0,
        }
        fields.update(overrides)
        return StudySpec.model_validate(fields)

    return build


class WorkerProcesses:
    """Starts ``liptune worker`` subprocesses; :meth:`close` kills whatever is still running."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, storage_url: str, *args: str, name: str | None = None) -> subprocess.Popen:
        index = len(self.processes)
        name = name or f"w{index}"
        env = {
            **os.environ,
            "LIPTUNE_HOME": str(self.home),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        command = [
            sys.executable,
            "-m",
            "service.cli",
            "worker",
            "--storage",
            storage_url,
            "--data-dir",
            str(self.home),
            "--device",
            "cpu",
            "--threads",
            "1",
            "--id",
            name,
            *args,
        ]
        log = open(self.home / f"worker-{name}.log", "wb")  # noqa: SIM115 (outlives this call)
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
        log.close()
        self.processes.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.home / f"worker-{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
        for process in self.processes:
            process.wait()


@pytest.fixture
def worker_processes(tmp_path: Path) -> Iterator[WorkerProcesses]:
    """Start ``liptune worker`` subprocesses (``worker_processes.start(url, "--once")``); all are
    killed at teardown."""
    home = tmp_path / "home"
    home.mkdir()
    workers = WorkerProcesses(home)
    try:
        yield workers
    finally:
        workers.close()
