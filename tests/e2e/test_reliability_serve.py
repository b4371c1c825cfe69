"""A real `liptune serve` keeps its embedded workers running.

The worker is SIGKILLed in the middle of a trial (as the kernel's OOM killer would): the
supervisor logs why, restarts it after a back-off, ``/ready`` and ``/metrics`` say so, and the
study still ends with exactly ``n_trials`` completed trials, each with its own finished MLflow
run, and the API never answered a 5xx.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_serve_e2e import REPO_ROOT, free_port, wait_until
from tests.service.test_api_studies import DIGITS_SPEC

pytestmark = pytest.mark.slow
N_TRIALS = 2


class Server:
    """A `liptune serve` subprocess and a client that records every status it was answered."""

    def __init__(self, home: Path, log: Path, *args: str, env: dict[str, str]) -> None:
        self.port = free_port()
        self.log = log
        command = [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)]
        command += ["--data-dir", str(home), *args]
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env},
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.statuses: list[tuple[str, int]] = []
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}",
            timeout=90,
            event_hooks={"response": [self._record]},
        )

    def _record(self, response: httpx.Response) -> None:
        self.statuses.append((response.request.url.path, response.status_code))

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def answers(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"liptune serve exited with {self.process.returncode}")
        try:
            return self.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]

    def close(self) -> None:
        self.client.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    env = {"LIPTUNE_HEARTBEAT_INTERVAL": "1", "LIPTUNE_GRACE_PERIOD": "4"}
    server = Server(tmp_path / "home", tmp_path / "serve.log", "--workers", "1", env=env)
    try:
        wait_until(server.answers, 120, "the server did not answer", server.log)
        yield server
    finally:
        server.close()


def small_study() -> dict[str, Any]:
    return {
        **DIGITS_SPEC,
        "name": "supervised",
        "training": {"epochs": 4, "batch_size": 64, "lr": 0.005},
        "n_trials": N_TRIALS,
    }


def test_a_killed_embedded_worker_is_restarted_and_the_study_completes_exactly(
    server: Server, tmp_path: Path, mlflow_store
):
    from mlflow import MlflowClient

    created = server.client.post("/studies", json=small_study())
    assert created.status_code == 201, created.text
    study_id = created.json()["id"]

    def running_trial() -> bool:
        return server.get(f"/studies/{study_id}").json()["counts"]["RUNNING"] > 0

    wait_until(running_trial, 120, "no trial started", server.log)
    (pid,) = server.worker_pids()
    os.kill(pid, signal.SIGKILL)

    def restarted() -> dict[str, Any] | None:
        report = server.get("/ready").json().get("checks", {}).get("workers")
        if report and report["workers"][0]["restarts"] >= 1 and report["running"] == 1:
            return report
        return None

    report = wait_until(restarted, 30, "the worker was not restarted", server.log)
    assert report["workers"][0]["last_exit"] == "killed by SIGKILL"
    assert server.worker_pids() != [pid]
    metrics = server.get("/metrics").text
    assert 'liptune_embedded_worker_restarts_total{worker="0"} 1.0' in metrics
    assert 'liptune_embedded_workers{state="running"} 1.0' in metrics
    assert "killed by SIGKILL; restarting" in server.log.read_text()

    def finished() -> dict[str, Any] | None:
        study = server.get(f"/studies/{study_id}").json()
        return study if study["status"] != "running" else None

    study = wait_until(finished, 420, "the study did not finish", server.log)
    assert study["status"] == "completed", study
    assert study["counts"]["COMPLETE"] == N_TRIALS
    trials = server.get(f"/studies/{study_id}/trials", params={"size": 100}).json()["items"]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    runs = {t["mlflow_run_id"] for t in complete}
    assert len(complete) == N_TRIALS and len(runs) == N_TRIALS and None not in runs
    with mlflow_store(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"):
        client = MlflowClient()
        assert {client.get_run(run).info.status for run in runs} == {"FINISHED"}
    # /ready is 503 by design while no worker runs (the back-off); nothing else is a 5xx.
    errors = [(path, status) for path, status in server.statuses if status >= 500]
    assert all(path == "/ready" and status == 503 for path, status in errors), errors
