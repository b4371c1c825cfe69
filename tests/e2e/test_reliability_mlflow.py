"""A real ``mlflow server`` stopped under a running ``liptune worker`` and started again: the
trial whose record could not be written fails with the reason after a bounded, logged retry,
its parameters are re-enqueued, and the study still ends with exactly ``n_trials`` trials,
each with one FINISHED MLflow run; the run the outage cut short is ended as FAILED once MLflow
is back, so no run stays RUNNING."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from optuna.trial import TrialState

from service.app import create_app
from service.config import Settings
from tests.e2e.test_topology import BIN, Services, _healthy, child_env, free_port, wait_for
from tests.service.test_api_studies import DIGITS_SPEC
from worker.study._studies import optuna_study_name
from worker.tracking._mlflow import ABANDONED_REASON, FAILURE_TAG

N_TRIALS = 3


def mlflow_command(port: int, root: Path) -> list[str]:
    return [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "mlartifacts"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


@pytest.mark.slow
def test_an_mlflow_outage_fails_the_trial_with_a_reason_and_retries_its_parameters(
    tmp_path: Path,
):
    store_url = f"sqlite:///{tmp_path / 'liptune.db'}"
    port = free_port()
    mlflow_url = f"http://127.0.0.1:{port}"
    services = Services(tmp_path)
    try:
        mlflow = services.start("mlflow", mlflow_command(port, tmp_path), child_env())
        wait_for("MLflow", lambda: _healthy(f"{mlflow_url}/health"), 120, mlflow)
        client = TestClient(
            create_app(Settings(home=tmp_path / "api", storage_url=store_url, workers=0))
        )
        spec = {**DIGITS_SPEC, "n_trials": N_TRIALS, "training": {**DIGITS_SPEC["training"]}}
        spec["training"]["epochs"] = 2
        spec["max_retries"] = 10  # the parameters outlive however long MLflow takes to restart
        created = client.post("/studies", json=spec)
        assert created.status_code == 201, created.text
        study_name = optuna_study_name(created.json()["id"])
        storage = client.app.state.resources.storage
        worker = services.start(
            "worker",
            [
                str(BIN / "liptune"),
                "worker",
                "--once",
                "--storage",
                store_url,
                "--mlflow",
                mlflow_url,
                "--data-dir",
                str(tmp_path / "worker"),
                "--device",
                "cpu",
                "--threads",
                "1",
            ],
            # MLflow's own transport retries off: the worker's bounded retry is what waits.
            child_env(LIPTUNE_MLFLOW_RETRY_S="30", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"),
        )

        def trials(state: TrialState) -> list[optuna.trial.FrozenTrial]:
            study = optuna.load_study(study_name=study_name, storage=storage)
            return study.get_trials(deepcopy=False, states=(state,))

        wait_for("a first trial", lambda: trials(TrialState.COMPLETE) or None, 300, worker)
        tracker = MlflowClient(mlflow_url)

        def running_runs() -> list[Any]:
            experiments = [e.experiment_id for e in tracker.search_experiments()]
            return tracker.search_runs(experiments, filter_string="attributes.status = 'RUNNING'")

        # The server goes away in the middle of the study, while a trial writes its run.
        (half_written,) = wait_for("a run being written", lambda: running_runs() or None, 300)
        mlflow.kill()
        failed = wait_for("a failed trial", lambda: trials(TrialState.FAIL) or None, 300, worker)
        mlflow = services.start("mlflow-again", mlflow_command(port, tmp_path), child_env())
        wait_for("MLflow again", lambda: _healthy(f"{mlflow_url}/health"), 120, mlflow)
        assert worker.process.wait(timeout=600) == 0, worker.tail()

        reason = failed[0].user_attrs["liptune.failure_reason"]
        assert reason.startswith("TrackingUnavailable: MLflow unreachable for 30 s"), reason
        log = worker.log.read_text()
        assert "MLflow unreachable in" in log and "retrying in" in log
        complete = trials(TrialState.COMPLETE)
        assert len(complete) == N_TRIALS
        # The failed trial's parameters were enqueued again (once per failure) until trained.
        study = optuna.load_study(study_name=study_name, storage=storage)
        by_retry_of = {t.user_attrs.get("liptune.retry_of"): t for t in study.trials}
        chain = [failed[0]]
        while chain[-1].state == TrialState.FAIL:
            assert chain[-1].number in by_retry_of, [(t.number, t.state) for t in chain]
            chain.append(by_retry_of[chain[-1].number])
        assert chain[-1].state == TrialState.COMPLETE
        assert all(t.params == failed[0].params for t in chain)
        runs = MlflowClient(mlflow_url).search_runs(
            [e.experiment_id for e in MlflowClient(mlflow_url).search_experiments()],
            filter_string="attributes.status = 'FINISHED'",
        )
        finished = [run.data.tags.get("liptune.trial_number") for run in runs]
        assert sorted(finished) == sorted(str(t.number) for t in complete)
        # The run the outage cut short was ended once MLflow answered again: none is RUNNING.
        assert running_runs() == []
        abandoned = tracker.get_run(half_written.info.run_id)
        assert abandoned.info.status == "FAILED"
        assert abandoned.data.tags[FAILURE_TAG] == ABANDONED_REASON
        assert "ended MLflow runs abandoned in an outage as FAILED" in log
    finally:
        services.stop_all()
