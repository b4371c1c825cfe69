"""Credentials in the store URLs never reach a command line, /ready or a problem body."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.commands.worker import worker_command, worker_env
from service.config import Settings
from tests.e2e.test_serve_e2e import REPO_ROOT

SECRET = "s3cr3t-pw"


def test_embedded_workers_get_the_store_urls_in_their_environment_only(tmp_path: Path):
    settings = Settings(
        home=tmp_path,
        storage_url=f"postgresql+psycopg2://liptune:{SECRET}@db.example/liptune",
        mlflow_uri=f"http://tracker:{SECRET}@mlflow.example:5000",
    )
    command = worker_command(settings, worker_id="serve-0", threads=1)
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


def test_no_response_nor_log_line_of_a_real_app_carries_a_store_password(
    tmp_path: Path, postgres_url: str, caplog, monkeypatch
):
    """Every read route (pages, data attributes, figures, problems, /ready, /metrics), the
    error paths that quote MLflow's own messages, and the log records: no password."""
    import logging

    import numpy as np

    from tests.service.test_api_studies import DIGITS_SPEC
    from tests.service.test_pages import told_trial
    from tests.service.test_reliability_reads import OPEN, PAGES, PROTECTED, figure_name, url
    from worker.study._studies import load_study

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    # Trust authentication: PostgreSQL accepts the URL whatever its password.
    storage_url = postgres_url.replace("postgres@", f"postgres:{SECRET}@")
    assert SECRET in storage_url
    caplog.set_level(logging.DEBUG)
    client = TestClient(
        create_app(
            Settings(
                home=tmp_path,
                workers=0,
                cache_ttl_s=0.0,
                storage_url=storage_url,
                mlflow_uri=f"http://tracker:{SECRET}@127.0.0.1:9",
            )
        ),
        raise_server_exceptions=False,
    )
    created = client.post("/studies", json=DIGITS_SPEC)
    assert created.status_code == 201, created.text
    study_id = created.json()["id"]
    trial = told_trial(0, np.random.default_rng(0))
    trial.user_attrs["liptune.model_uri"] = "models:/m-0123456789abcdef"
    load_study(client.app.state.resources.storage, study_id).add_trial(trial)

    responses = [created]
    for path in PROTECTED + OPEN:
        responses.append(client.get(url(path, study_id, figure_name(path))))
    pages = [client.get(url(path, study_id), headers={"Accept": "text/html"}) for path in PAGES]
    responses += pages
    responses += [
        client.get(f"/studies/{study_id}/trials/0/model?format=pt"),
        client.get(f"/studies/{study_id}/trials/0/model?format=onnx"),
        client.post(f"/studies/{study_id}/trials/0/register", json={"name": "m"}),
        client.get("/studies/nope"),
        client.post("/studies", json={**DIGITS_SPEC, "n_trials": -1}),
    ]
    # MLflow's errors quote its URL: the problems that relay them are where a password leaks.
    assert {502, 422} & {response.status_code for response in responses}
    assert "127.0.0.1:9" in pages[-1].text  # the MLflow link is there, without credentials
    assert any("tracker:***@127.0.0.1:9" in response.text for response in responses)
    for response in responses:
        assert SECRET not in response.text, (response.request.url, response.text[:300])
        assert SECRET not in str(response.headers)
    # A library that logs the URL (SQLAlchemy, MLflow, urllib3 do on errors) is redacted too.
    logging.getLogger("urllib3.connectionpool").warning("retrying %s", storage_url)
    assert SECRET not in caplog.text
    assert "postgres:***@" in caplog.text
