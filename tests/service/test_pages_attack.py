"""The attack check of a trial's certificates through the API and the trial page.

A real digits study (submitted through the API, trained by an in-process worker) shows its
attack summary in ``/pareto`` and the trial detail, the per-point pairs behind it and the
figure of certified radius against adversarial distance; a trial whose record holds a broken
certificate is flagged in the list, the front and the figure.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import mlflow.artifacts
import numpy as np
import optuna
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.service.test_api_studies import DIGITS_SPEC
from tests.service.test_pages import HTML, JSON, told_trial, with_role
from worker.loop import Worker, WorkerOptions
from worker.study._record import TrialAttributes
from worker.study._studies import load_study
from worker.tracking._mlflow import TrackingConfig
from worker.trial._certificates import AttackSummary


@pytest.fixture
def app_client(tmp_path: Path, sqlite_url: str) -> TestClient:
    return TestClient(create_app(Settings(home=tmp_path, storage_url=sqlite_url, cache_ttl_s=0)))


def test_a_trained_trial_shows_its_attack_check_and_is_attacked_again_on_demand(
    app_client: TestClient, sqlite_url: str, tmp_path: Path, one_torch_thread: None
) -> None:
    spec = copy.deepcopy(DIGITS_SPEC)
    spec.update(name="attacked", n_trials=1)
    spec["model"] = {"name": "mlp", "widths": [32]}
    spec["training"] = {"epochs": 2, "batch_size": 128, "lr": 0.01}
    response = app_client.post("/studies", json=spec)
    assert response.status_code == 201, response.text
    study_id = response.json()["id"]
    options = WorkerOptions(
        storage_url=sqlite_url,
        tracking=TrackingConfig.for_home(tmp_path),
        threads=1,
        device="cpu",
        idle_poll_max_s=0.2,
    )
    runner = Worker(options)
    while runner.run_next():
        pass

    (item,) = app_client.get(f"/studies/{study_id}/pareto").json()["trials"]
    attack = item["attack"]
    assert attack["points"] == 100 and item["certificate_violations"] == 0
    assert attack["violations"] == 0 and "pairs" not in attack
    detail = app_client.get(f"/studies/{study_id}/trials/0", headers=JSON).json()
    assert detail["attack"] == attack
    pairs = detail["attack_pairs"]
    assert len(pairs) == attack["points"]
    # The summary is what the stored pairs say (recomputed here with numpy).
    found = np.array([(r, d) for r, d in pairs if d is not None and d > 0])
    assert int((found[:, 1] < found[:, 0]).sum()) == attack["violations"]
    ratio = found[:, 0] / found[:, 1]
    assert attack["tightness_median"] == pytest.approx(np.quantile(ratio, 0.5), rel=1e-9)
    assert attack["tightness_p10"] == pytest.approx(np.quantile(ratio, 0.1), rel=1e-9)
    assert 0 < attack["tightness_p10"] <= attack["tightness_median"] <= 1.0

    figure = app_client.get(f"/studies/{study_id}/trials/0/figures/attack", headers=JSON).json()
    (diagonal,) = with_role(figure, "diagonal")
    assert diagonal["x"] == diagonal["y"]
    (points,) = with_role(figure, "attacked")
    assert sorted(points["y"]) == pytest.approx(sorted(found[:, 0].tolist()))
    assert sorted(points["x"]) == pytest.approx(sorted(found[:, 1].tolist()))
    assert with_role(figure, "violation") == []
    assert figure["layout"]["meta"]["violations"] == 0

    page = app_client.get(f"/studies/{study_id}/trials/0", headers=HTML)
    assert page.status_code == 200
    assert 'id="attack-plot"' in page.text and 'id="certificate-violations"' in page.text

    # On demand: POST .../attack loads the logged model from MLflow and repeats the worker's
    # check on the same points, logged to the trial's run.
    again = app_client.post(f"/studies/{study_id}/trials/0/attack")
    assert again.status_code == 200, again.text
    body = again.json()
    assert body["trial"] == 0 and body["points"] == 100 and body["violations"] == 0
    assert [r for r, _ in body["pairs"]] == pytest.approx([r for r, _ in pairs], rel=1e-5)
    assert body["tightness_median"] == pytest.approx(attack["tightness_median"], rel=1e-3)
    path = mlflow.artifacts.download_artifacts(
        run_id=detail["mlflow_run_id"],
        artifact_path="attack_check.json",
        dst_path=str(tmp_path / "downloaded"),
        tracking_uri=options.tracking.tracking_uri,
    )
    logged = json.loads(Path(path).read_text())
    assert logged["violations"] == 0 and len(logged["pairs"]) == 100
    assert app_client.post(f"/studies/{study_id}/trials/5/attack").status_code == 404


def test_a_broken_certificate_is_flagged_everywhere(app_client: TestClient) -> None:
    response = app_client.post("/studies", json={**DIGITS_SPEC, "name": "broken"})
    assert response.status_code == 201, response.text
    study_id = response.json()["id"]
    study = load_study(app_client.app.state.resources.storage, study_id)
    rng = np.random.default_rng(0)
    pairs = ((0.5, 0.9), (0.4, 0.3), (0.2, None))  # the second: adversarial inside the radius
    attack = AttackSummary(
        points=3, violations=1, tightness_median=0.9, tightness_p10=0.6, tightness_p90=1.2,
        pairs=pairs,
    )  # fmt: skip
    for number in range(2):
        trial = told_trial(number, rng)
        if number == 1:  # the front's trial
            attrs: dict[str, Any] = {
                **trial.user_attrs,
                **TrialAttributes(attack=attack).user_attrs(),
            }
            trial = optuna.trial.create_trial(
                params=trial.params,
                distributions=trial.distributions,
                values=trial.values,
                user_attrs=attrs,
            )
        study.add_trial(trial)

    listed = {t["number"]: t for t in app_client.get(f"/studies/{study_id}/trials").json()["items"]}
    assert listed[1]["certificate_violations"] == 1
    assert listed[1]["attack"]["tightness_p90"] == 1.2
    assert listed[0]["certificate_violations"] is None and listed[0]["attack"] is None
    front = app_client.get(f"/studies/{study_id}/pareto").json()["trials"]
    assert {t["number"]: t["certificate_violations"] for t in front} == {1: 1}
    detail = app_client.get(f"/studies/{study_id}/trials/1", headers=JSON).json()
    assert detail["attack_pairs"] == [[0.5, 0.9], [0.4, 0.3], [0.2, None]]

    figure = app_client.get(f"/studies/{study_id}/trials/1/figures/attack", headers=JSON).json()
    (broken,) = with_role(figure, "violation")
    assert (broken["x"], broken["y"]) == ([0.3], [0.4])
    assert figure["layout"]["meta"] == {"points": 3, "violations": 1, "missed": 1}
    assert "1 broken" in figure["layout"]["annotations"][0]["text"]
    empty = app_client.get(f"/studies/{study_id}/trials/0/figures/attack", headers=JSON).json()
    assert "no per-point attack check" in empty["layout"]["meta"]["empty"]
