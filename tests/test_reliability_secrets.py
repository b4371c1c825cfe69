"""Credentials in the store URLs never reach a command line, /ready or a problem body."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.commands.serve import worker_command, worker_env
from service.config import Settings
from tests.test_serve_e2e import REPO_ROOT

SECRET = "s3cr3t-pw"


def test_embedded_workers_get_the_store_urls_in_their_environment_only(tmp_path: Path):
    settings = Settings(
        home=tmp_path,
        storage_url=f"postgresql+psycopg2://liptune:{SECRET}@db.example/liptune",
        mlflow_uri=f"http://tracker:{SECRET}@mlflow.example:5000",
    )
    command = worker_command(settings, 0, 1)
    assert not any(SECRET in part for part in command), command
    env = worker_env(settings, 1)
    assert SECRET in env["LIPTUNE_STORAGE_URL"] and SECRET in env["LIPTUNE_MLFLOW_URI"]


def test_a_worker_reads_its_storage_from_the_environment(tmp_path: Path):
    """`liptune worker --once` on an empty SQLite store named only by the environment migrates
    that very file and exits 0."""
    store = tmp_path / "from-env.db"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker", "--once", "--mlflow", "none"],
        cwd=REPO_ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "LIPTUNE_HOME": str(tmp_path / "home"),
            "LIPTUNE_STORAGE_URL": f"sqlite:///{store}",
        },
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert store.exists() and not (tmp_path / "home" / "liptune.db").exists()


def test_ready_and_problems_do_not_echo_the_storage_url(tmp_path: Path):
    client = TestClient(
        create_app(Settings(home=tmp_path, mlflow_uri=f"http://u:{SECRET}@127.0.0.1:9/"))
    )
    started = time.monotonic()
    ready = client.get("/ready")  # MLflow's server is down: /ready says so within seconds
    assert time.monotonic() - started < 5
    assert ready.status_code == 503 and SECRET not in ready.text
    assert ready.headers["retry-after"] and "MLflow" in ready.json()["detail"]
