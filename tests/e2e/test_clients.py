"""What the tools users already have show of a liptune study: optuna-dashboard (through its own
WSGI app and JSON API) and optuna.visualization."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable
from typing import Any
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
from optuna_dashboard import wsgi

from service.migrations import upgrade
from worker.loop import Worker, WorkerOptions
from worker.study._record import key
from worker.study._studies import create_study, optuna_study_name

optuna.logging.set_verbosity(optuna.logging.WARNING)


def dashboard_get(app: Any, path: str) -> dict[str, Any]:
    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    environ["wsgi.input"] = io.BytesIO()
    status: list[str] = []
    body = b"".join(app(environ, lambda code, _headers, *_: status.append(code)))
    assert status[0].startswith("200"), (status, body[:500])
    return json.loads(body)


def run_study(url: str, spec: Any) -> str:
    study_id = uuid.uuid4().hex
    upgrade(url)
    create_study(url, spec, study_id)
    options = WorkerOptions(storage_url=url, threads=1, device="cpu", exit_when_idle=True)
    assert Worker(options).run() == spec.n_trials
    return study_id


def study_detail(url: str, study_id: str) -> dict[str, Any]:
    """``GET /api/studies/ID`` of optuna-dashboard's own app on the study's storage."""
    storage = optuna.storages.RDBStorage(url)
    optuna_id = storage.get_study_id_from_name(optuna_study_name(study_id))
    return dashboard_get(wsgi(storage), f"/api/studies/{optuna_id}")


def test_dashboard_names_the_objectives_and_shows_each_trials_record(
    sqlite_url: str, tiny_study_spec: Callable[..., Any]
) -> None:
    url = sqlite_url
    study_id = run_study(url, tiny_study_spec(n_trials=1))
    detail = study_detail(url, study_id)
    assert detail["objective_names"] == ["accuracy", "certified_accuracy_eps_0.1"]
    (trial,) = detail["trials"]
    attrs = {attr["key"]: attr["value"] for attr in trial["user_attrs"]}
    assert key("epochs") in attrs and "val_accuracy" in attrs[key("epochs")]
    assert key("mlflow_run_id") not in attrs  # this study tracked nothing
    assert len(trial["values"]) == 2
    study = optuna.load_study(study_name=optuna_study_name(study_id), storage=url)
    figure = optuna.visualization.plot_pareto_front(study)
    assert figure.layout.xaxis.title.text == "accuracy"


def test_dashboard_draws_the_epochs_of_a_single_objective_study(
    sqlite_url: str, tiny_study_spec: Callable[..., Any]
) -> None:
    url = sqlite_url
    spec = tiny_study_spec(
        n_trials=1,
        objectives=[{"metric": "accuracy"}],
        training={"epochs": 3, "batch_size": 64, "lr": 0.01, "device": "cpu"},
    )
    study_id = run_study(url, spec)
    detail = study_detail(url, study_id)
    assert detail["has_intermediate_values"] is True
    (trial,) = detail["trials"]
    assert [point["step"] for point in trial["intermediate_values"]] == [1, 2, 3]
    study = optuna.load_study(study_name=optuna_study_name(study_id), storage=url)
    epochs = study.trials[0].user_attrs[key("epochs")]
    assert [point["value"] for point in trial["intermediate_values"]] == pytest.approx(
        [epoch["val_accuracy"] for epoch in epochs]
    )
