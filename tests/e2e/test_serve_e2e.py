"""End to end: the digits study of the studies issue through a real `liptune serve`.

The server runs as a subprocess on a free loopback port with two embedded workers and a fresh
data directory, once on SQLite and once on PostgreSQL. The study must complete, its front must
be non-dominated, and a registered model must load back with ``mlflow.pytorch.load_model`` and
predict as the downloaded ONNX file does in onnxruntime.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.test_api_studies import DIGITS_SPEC

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]
STUDY_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout_s: float, what: str, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1.0)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    pytest.fail(f"{what} within {timeout_s} s; server log:\n{tail}")


@contextmanager
def running_serve(
    home: Path, log: Path, *arguments: str, env: dict[str, str] | None = None
) -> Iterator[httpx.Client]:
    """A real ``liptune serve`` on a free loopback port with its data under ``home`` (output in
    ``log``), ``arguments`` added to its command line; a client once it answers, and SIGTERM
    (then SIGKILL after 90 s) when the block ends."""
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    command += ["--data-dir", str(home), *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT
        )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)

    def healthy() -> bool:
        if process.poll() is not None:
            pytest.fail(f"liptune serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            return client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, 120, "the server did not answer", log)
        yield client
    finally:
        client.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def server(tmp_path: Path, storage_url: str):
    home, log = tmp_path / "home", tmp_path / "serve.log"
    with running_serve(home, log, "--workers", "2", "--storage", storage_url) as client:
        yield client, home, log


def test_digits_study_end_to_end(server, tmp_path: Path, mlflow_store):
    import mlflow.pyfunc
    import mlflow.pytorch
    import onnxruntime
    import torch

    client, home, log = server
    created = client.post("/studies", json=DIGITS_SPEC)
    assert created.status_code == 201, created.text
    study_id = created.json()["id"]

    def finished():
        study = client.get(f"/studies/{study_id}").json()
        return study if study["status"] != "running" else None

    study = wait_until(finished, STUDY_TIMEOUT_S, "the study did not finish", log)
    assert study["status"] == "completed", study
    assert study["counts"]["COMPLETE"] == 8
    assert study["hypervolume"] > 0

    front = client.get(f"/studies/{study_id}/pareto").json()["trials"]
    assert front
    everything = client.get(f"/studies/{study_id}/trials", params={"size": 100}).json()["items"]
    keys = ["accuracy", "certified_accuracy_eps_0.3"]
    completed = [t for t in everything if t["state"] == "COMPLETE"]
    for member in front:
        mine = np.array([member["values"][k] for k in keys])
        for other in completed:
            theirs = np.array([other["values"][k] for k in keys])
            assert not (np.all(theirs >= mine) and np.any(theirs > mine)), (member, other)

    chosen = front[0]["number"]
    registered = client.post(
        f"/studies/{study_id}/trials/{chosen}/register",
        json={"name": "digits-e2e", "aliases": ["champion"]},
    )
    assert registered.status_code == 201, registered.text
    model_uri = registered.json()["model_uri"]
    assert model_uri == "models:/digits-e2e@champion"

    onnx = client.get(f"/studies/{study_id}/trials/{chosen}/model", params={"format": "onnx"})
    assert onnx.status_code == 200
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(onnx.content)

    with mlflow_store(f"sqlite:///{home / 'mlflow.db'}"):
        model = mlflow.pytorch.load_model(model_uri).eval()
        served = mlflow.pyfunc.load_model(model_uri)
    inputs = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(inputs).numpy()
    session = onnxruntime.InferenceSession(str(onnx_path))
    name = session.get_inputs()[0].name
    outputs, radius = session.run(None, {name: inputs.numpy()})
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-5)
    assert np.array_equal(outputs.argmax(axis=1), expected.argmax(axis=1))
    # The registered model's pyfunc answers the label and the radius the ONNX graph computes.
    answer = served.predict(inputs.numpy())
    assert answer["label"].tolist() == expected.argmax(axis=1).tolist()
    np.testing.assert_allclose(answer["radius"], radius, rtol=1e-4, atol=1e-5)
