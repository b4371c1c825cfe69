"""API tests of a study's results: trials, Pareto fronts (also at another eps), knee,
recommendations, 409 for incomplete trials, and the infinite alpha_kr in JSON.

The study is submitted through the API, then filled through Optuna directly with synthetic told
values and radii (the real storage, no training).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pytest
from fastapi.testclient import TestClient
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from service import results
from service.schemas import TrialRecord
from tests.service.test_api_studies import DIGITS_SPEC, PROBLEM, make_client
from worker.trial._certificates import RadiiSummary

CERT = "certified_accuracy_eps_0.3"
DISTRIBUTIONS = {
    "loss": CategoricalDistribution(["hkr", "tau_ce"]),
    "margin": FloatDistribution(0.01, 2.0, log=True),
    "alpha_kr": CategoricalDistribution([10.0, math.inf]),
}
# (accuracy, certified accuracy at 0.3, radius of the certified points): a trade-off curve
POINTS = [(0.95, 0.20, 0.35), (0.90, 0.50, 0.8), (0.85, 0.45, 0.5), (0.70, 0.65, 1.5)]


def _radii(accuracy: float, certified: float, radius: float, n: int = 200) -> RadiiSummary:
    """n points: `accuracy` of them correct, `certified` of them with `radius`, the rest 0.1."""
    correct = np.arange(n) < round(accuracy * n)
    radii = np.where(np.arange(n) < round(certified * n), radius, 0.1)
    return RadiiSummary.from_arrays(radii, correct)


@pytest.fixture
def populated(tmp_path: Path, storage_url: str) -> tuple[TestClient, str]:
    client = make_client(tmp_path, storage_url)
    study_id = client.post("/studies", json=DIGITS_SPEC).json()["id"]
    study = optuna.load_study(
        study_name=f"liptune-{study_id}", storage=client.app.state.resources.storage
    )
    for number, (accuracy, certified, radius) in enumerate(POINTS):
        alpha = math.inf if number == 0 else 10.0
        study.add_trial(
            create_trial(
                params={"loss": "hkr", "margin": 0.1 * (number + 1), "alpha_kr": alpha},
                distributions=DISTRIBUTIONS,
                values=[accuracy, certified],
                user_attrs={
                    "liptune.metrics": {"accuracy": accuracy, CERT: certified},
                    "liptune.radii": _radii(accuracy, certified, radius).encode(),
                    "liptune.mlflow_run_id": f"{number:032x}",
                    "liptune.model_uri": f"models:/m-{number}",
                    "liptune.epochs": [{"epoch": 1, "train_loss": 0.5}],
                },
            )
        )
    study.add_trial(
        create_trial(
            state=TrialState.FAIL,
            params={"loss": "hkr", "margin": 0.3, "alpha_kr": 10.0},
            distributions=DISTRIBUTIONS,
            user_attrs={"liptune.failure_reason": "loss diverged (nan)"},
        )
    )
    study.enqueue_trial({"loss": "tau_ce"})
    return client, study_id


def test_trials_are_paginated_filtered_and_encode_infinity(populated):
    client, study_id = populated
    page = client.get(f"/studies/{study_id}/trials", params={"size": 4})
    assert page.status_code == 200
    body = page.json()
    assert (body["total"], body["pages"], len(body["items"])) == (6, 2, 4)
    assert body["items"][0]["params"]["alpha_kr"] == "Infinity"
    assert b'"alpha_kr":"Infinity"' in page.content
    failed = client.get(f"/studies/{study_id}/trials", params={"state": "FAIL"}).json()
    assert [t["failure_reason"] for t in failed["items"]] == ["loss diverged (nan)"]
    waiting = client.get(f"/studies/{study_id}/trials", params={"state": "WAITING"}).json()
    assert waiting["total"] == 1
    detail = client.get(f"/studies/{study_id}/trials/1").json()
    assert detail["epochs"] == [{"epoch": 1, "train_loss": 0.5}]
    assert detail["values"] == {"accuracy": 0.90, CERT: 0.50}
    missing = client.get(f"/studies/{study_id}/trials/99")
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM


def test_study_detail_counts_best_hypervolume(populated):
    client, study_id = populated
    study = client.get(f"/studies/{study_id}").json()
    assert study["counts"] == {"COMPLETE": 4, "RUNNING": 0, "WAITING": 1, "FAIL": 1, "PRUNED": 0}
    assert study["best"] == {
        "accuracy": {"value": 0.95, "trial": 0},
        CERT: {"value": 0.65, "trial": 3},
    }
    front = [(0.95, 0.20), (0.90, 0.50), (0.70, 0.65)]
    # area dominated above the origin: a staircase of boxes
    expected = 0.95 * 0.20 + 0.90 * (0.50 - 0.20) + 0.70 * (0.65 - 0.50)
    assert study["hypervolume"] == pytest.approx(expected)
    assert front == [(t["values"]["accuracy"], t["values"][CERT]) for t in _front(client, study_id)]
    assert study["eta_seconds"] is not None


def _front(client: TestClient, study_id: str, **params) -> list[dict]:
    response = client.get(f"/studies/{study_id}/pareto", params=params)
    assert response.status_code == 200, response.text
    return response.json()["trials"]


def test_pareto_front_and_front_at_another_eps(populated):
    client, study_id = populated
    assert [t["number"] for t in _front(client, study_id)] == [0, 1, 3]
    # at eps 0.6 trial 0 (radius 0.35) and 2 (0.5) certify nothing: 1 and 3 remain, and 0 for
    # its accuracy
    at_06 = _front(client, study_id, eps=0.6)
    assert [t["number"] for t in at_06] == [0, 1, 3]
    assert at_06[0]["values"]["certified_accuracy_eps_0.6"] == 0.0
    assert at_06[1]["values"]["certified_accuracy_eps_0.6"] == pytest.approx(0.5)
    # at eps 1.0 only trial 3 (radius 1.5) still certifies
    at_1 = _front(client, study_id, eps=1.0)
    assert [t["number"] for t in at_1] == [0, 3]
    bad = client.get(f"/studies/{study_id}/pareto", params={"eps": -1})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "query.eps"


def test_recommend_best_meeting_requirement_knee_and_how_close(populated):
    client, study_id = populated
    chosen = client.get(f"/studies/{study_id}/recommend", params={"min_certified_accuracy": 0.45})
    assert chosen.status_code == 200
    assert chosen.json()["trial"]["number"] == 1  # the most accurate with >= 0.45 certified
    by_accuracy = client.get(
        f"/studies/{study_id}/recommend", params={"min_accuracy": 0.8, "eps": 0.3}
    ).json()
    assert by_accuracy["trial"]["number"] == 1  # the most robust with >= 0.8 accuracy
    knee = client.get(f"/studies/{study_id}/recommend", params={"strategy": "knee"}).json()
    front = [TrialRecord.model_validate(trial) for trial in _front(client, study_id)]
    expected = results.knee(front, knee["objectives"])
    assert knee["trial"]["number"] == expected.number
    missed = client.get(f"/studies/{study_id}/recommend", params={"min_certified_accuracy": 0.9})
    assert missed.status_code == 404 and missed.headers["content-type"] == PROBLEM
    problem = missed.json()
    assert "0.65" in problem["detail"] and problem["best_achieved"] == {CERT: 0.65}
    assert problem["closest"]["number"] == 3
    assert problem["shortfall"][CERT] == pytest.approx(0.25)
    nothing = client.get(f"/studies/{study_id}/recommend")
    assert nothing.status_code == 422
    assert nothing.json()["errors"][0]["field"] == "query.min_certified_accuracy"


def test_register_and_download_need_a_complete_trial(populated):
    client, study_id = populated
    for number in (4, 5):  # FAIL, WAITING
        register = client.post(
            f"/studies/{study_id}/trials/{number}/register", json={"name": "m", "aliases": []}
        )
        assert register.status_code == 409 and register.headers["content-type"] == PROBLEM
        assert "only a COMPLETE trial" in register.json()["detail"]
        download = client.get(f"/studies/{study_id}/trials/{number}/model")
        assert download.status_code == 409
    bad_alias = client.post(
        f"/studies/{study_id}/trials/1/register", json={"name": "m", "aliases": ["v2"]}
    )
    assert bad_alias.status_code == 422
    assert bad_alias.json()["errors"][0]["field"] == "body.aliases"
    bad_format = client.get(f"/studies/{study_id}/trials/1/model", params={"format": "h5"})
    assert bad_format.status_code == 422
    assert bad_format.json()["errors"][0]["field"] == "query.format"


def test_cache_sees_new_trials_and_keeps_finished_ones(populated):
    client, study_id = populated
    assert client.get(f"/studies/{study_id}").json()["counts"]["COMPLETE"] == 4
    study = optuna.load_study(
        study_name=f"liptune-{study_id}", storage=client.app.state.resources.storage
    )
    trial = study.ask()  # takes the WAITING trial: RUNNING now
    counts = client.get(f"/studies/{study_id}").json()["counts"]
    assert (counts["RUNNING"], counts["WAITING"]) == (1, 0)
    study.tell(trial, [0.99, 0.99])
    assert client.get(f"/studies/{study_id}").json()["best"]["accuracy"]["trial"] == trial.number
    assert [t["number"] for t in _front(client, study_id)] == [trial.number]
