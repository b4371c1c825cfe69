"""The docker-compose topology as local processes on loopback.

The same services that docker-compose.yml starts, configured the same way: a fresh pair of
databases on the local PostgreSQL server, ``mlflow server`` backed by one of them and serving its
artifacts, ``liptune serve --workers 0`` (configured by ``LIPTUNE_*`` environment variables, as
in the compose file) on the other, and two ``liptune worker`` processes. A small digits study
runs end to end over HTTP while one worker is killed mid-trial; the chosen model is registered
through the API and loaded back through the MLflow server.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import mlflow.pytorch
import numpy as np
import onnxruntime
import psycopg2
import pytest
import torch
from psycopg2 import sql

from worker.spec import DatasetSpec
from worker.trial.datasets import load_dataset

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

BIN = Path(sys.executable).parent
SERVER = "postgresql://postgres@127.0.0.1:5432"
#: The same server as an SQLAlchemy URL; 2.1 reads a bare postgresql:// as psycopg 3.
SERVER_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432"
#: Seconds between heartbeats of a running trial, and how long without one makes it stale.
HEARTBEAT_INTERVAL_S = 1
GRACE_PERIOD_S = 4
STUDY = {
    "name": "topology-digits",
    "dataset": {"name": "digits"},
    "model": {"name": "mlp", "widths": [32]},
    "training": {"epochs": 2, "batch_size": 128, "lr": 0.01},
    "search_space": {
        "loss": ["hkr", "tau_ce"],
        "margin": {"low": 0.05, "high": 1.0, "log": True},
        "alpha_kr": {"low": 1.0, "high": 100.0, "log": True},
        "temperature": {"low": 1.0, "high": 50.0, "log": True},
    },
    "objectives": [{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.3}],
    "n_trials": 3,
    "seed": 0,
}
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, *watched: Service) -> T:
    """Poll ``probe`` until it returns something; fail early if a watched process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for service in watched:
            service.check_alive()
        result = probe()
        if result is not None:
            return result
        time.sleep(0.25)
    logs = "\n".join(service.tail() for service in watched)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


@dataclass
class Service:
    """A process in its own process group, its output in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.process.returncode}\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(text)

    def kill(self) -> None:
        """SIGKILL the whole group: nothing it started (the MLflow server's own workers) may
        outlive the test."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


class Services:
    """Starts processes and stops every one of them, whatever happens in between."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Service] = []

    def start(self, name: str, command: list[str], env: dict[str, str]) -> Service:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        service = Service(name, process, log)
        self.started.append(service)
        return service

    def stop_all(self) -> None:
        for service in self.started:
            service.kill()
        deadline = time.monotonic() + 15
        for service in self.started:
            while _group_alive(service.process.pid):
                assert time.monotonic() < deadline, f"processes of {service.name} outlived it"
                time.sleep(0.1)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def child_env(**variables: str) -> dict[str, str]:
    """This environment without any LIPTUNE_/MLFLOW_ setting of the developer's, plus these."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LIPTUNE_", "MLFLOW_"))
    }
    return {**env, "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true", **variables}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def databases() -> Iterator[dict[str, str]]:
    """A fresh liptune database and MLflow database, dropped at the end."""
    try:
        admin = psycopg2.connect(f"{SERVER}/postgres", connect_timeout=5)
    except psycopg2.OperationalError as error:
        pytest.fail(
            f"PostgreSQL is not reachable at {SERVER} ({error}); start it with "
            "`sh scripts/system-deps.sh`: the topology test needs the real server",
            pytrace=False,
        )
    admin.autocommit = True
    suffix = uuid.uuid4().hex[:12]
    names = {"liptune": f"liptune_topology_{suffix}", "mlflow": f"mlflow_topology_{suffix}"}
    try:
        with admin.cursor() as cursor:
            for name in names.values():
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        yield {role: f"{SERVER_URL}/{name}" for role, name in names.items()}
    finally:
        with admin.cursor() as cursor:
            for name in names.values():
                cursor.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        admin.close()


@dataclass
class Topology:
    api_url: str
    api_key: str
    mlflow_url: str
    artifacts: Path
    api: Service
    mlflow: Service
    workers: list[Service]

    @property
    def everything(self) -> list[Service]:
        return [self.mlflow, self.api, *self.workers]


@pytest.fixture(scope="module")
def topology(
    databases: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Topology]:
    from service.config import hash_api_key

    root = tmp_path_factory.mktemp("topology")
    artifacts = root / "mlartifacts"
    services = Services(root)
    try:
        mlflow_port = free_port()
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        mlflow = services.start(
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                databases["mlflow"],
                "--artifacts-destination",
                str(artifacts),
                "--serve-artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
            ],
            child_env(),
        )

        api_key = secrets.token_urlsafe(24)
        api_port = free_port()
        api_url = f"http://127.0.0.1:{api_port}"
        # Configured as in docker-compose.yml: by LIPTUNE_* variables; --workers 0 as there.
        api = services.start(
            "api",
            [
                str(BIN / "liptune"),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(api_port),
                "--workers",
                "0",
            ],
            child_env(
                LIPTUNE_HOME=str(root / "api-home"),
                LIPTUNE_STORAGE_URL=databases["liptune"],
                LIPTUNE_MLFLOW_URI=mlflow_url,
                LIPTUNE_API_KEY_HASHES=json.dumps([hash_api_key(api_key)]),
            ),
        )
        # The API needs MLflow only to register or download a model, so both start at once.
        wait_for("the API", lambda: _healthy(f"{api_url}/health"), 120, api, mlflow)

        # Started once the API is healthy (its migrations ran), as compose orders them.
        workers = [
            services.start(
                f"worker-{index}",
                [
                    str(BIN / "liptune"),
                    "worker",
                    "--storage",
                    databases["liptune"],
                    "--mlflow",
                    mlflow_url,
                    "--data-dir",
                    str(root / f"worker-{index}-home"),
                    "--device",
                    "cpu",
                    "--threads",
                    "1",
                    "--heartbeat-interval",
                    str(HEARTBEAT_INTERVAL_S),
                    "--grace-period",
                    str(GRACE_PERIOD_S),
                    "--id",
                    f"worker-{index}",
                ],
                child_env(),
            )
            for index in range(2)
        ]
        # Runs start on MLflow: no study before the server answers.
        wait_for(
            "the MLflow server",
            lambda: _healthy(f"{mlflow_url}/health"),
            120,
            mlflow,
            api,
            *workers,
        )
        yield Topology(api_url, api_key, mlflow_url, artifacts, api, mlflow, workers)
    finally:
        services.stop_all()


def _healthy(url: str) -> bool | None:
    try:
        return True if httpx.get(url, timeout=2).status_code == 200 else None
    except httpx.HTTPError:
        return None


# --------------------------------------------------------------------------- the study


def test_study_survives_a_killed_worker_and_its_model_loads_from_mlflow(
    topology: Topology, mlflow_store: Callable[[str], AbstractContextManager[None]]
) -> None:
    api = httpx.Client(
        base_url=topology.api_url, headers={"X-API-Key": topology.api_key}, timeout=30
    )
    created = api.post("/studies", json=STUDY)
    assert created.status_code == 201, created.text
    study_id = created.json()["id"]

    def training() -> int:
        """Running trials whose parameters are stored (a worker killed between Optuna's ask
        and the suggestion leaves a trial with nothing to retry)."""
        items = api.get(f"/studies/{study_id}/trials", params={"size": 100}).json()["items"]
        return sum(1 for t in items if t["state"] == "RUNNING" and t["params"].get("loss"))

    # Both workers busy: the one killed now dies in the middle of a trial.
    wait_for(
        "both workers to train a trial",
        lambda: True if training() == 2 else None,
        120,
        *topology.everything,
    )
    victim, survivor = topology.workers
    victim.kill()

    def finished() -> dict[str, Any] | None:
        study = api.get(f"/studies/{study_id}").json()
        return study if study["status"] != "running" else None

    study = wait_for("the study to finish", finished, 180, topology.api, topology.mlflow, survivor)
    assert study["status"] == "completed"
    assert study["counts"].get("COMPLETE") == STUDY["n_trials"]

    trials = api.get(f"/studies/{study_id}/trials", params={"size": 100}).json()["items"]
    assert not [trial for trial in trials if trial["state"] == "RUNNING"]
    failed = [
        api.get(f"/studies/{study_id}/trials/{trial['number']}").json()
        for trial in trials
        if trial["state"] == "FAIL"
    ]
    (killed,) = [trial for trial in failed if trial["worker"] == victim.name]
    assert "heartbeat" in killed["failure_reason"]
    retries = [trial for trial in trials if trial["retry_of"] == killed["number"]]
    assert [trial["state"] for trial in retries] == ["COMPLETE"], "its parameters were not retried"
    assert retries[0]["params"] == killed["params"]

    # The chosen model: registered through the API, loaded back through the MLflow server.
    front = api.get(f"/studies/{study_id}/pareto").json()["trials"]
    chosen = front[0]
    name = f"topology-{study_id[:8]}"
    registered = api.post(
        f"/studies/{study_id}/trials/{chosen['number']}/register",
        json={"name": name, "aliases": ["chosen"]},
    )
    assert registered.status_code in (200, 201), registered.text
    model_uri = registered.json()["model_uri"]
    assert model_uri == f"models:/{name}@chosen"

    with mlflow_store(topology.mlflow_url):
        model = mlflow.pytorch.load_model(model_uri).eval()
    onnx_file = api.get(
        f"/studies/{study_id}/trials/{chosen['number']}/model", params={"format": "onnx"}
    )
    assert onnx_file.status_code == 200, onnx_file.text
    session = onnxruntime.InferenceSession(onnx_file.content)
    inputs = load_dataset(DatasetSpec(name="digits"), data_roots=[], seed=0).test.x[:256]
    with torch.no_grad():
        loaded = model(inputs).numpy()
    exported, radius = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    assert loaded.shape == (len(inputs), 10) and radius.shape == (len(inputs),)
    np.testing.assert_allclose(loaded, exported, rtol=1e-4, atol=1e-5)

    # Clients uploaded through the server: the artifacts lie in its destination only.
    assert list(topology.artifacts.rglob("MLmodel")), "no model reached the MLflow server"
