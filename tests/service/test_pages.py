"""The web pages' routes and figure endpoints, on a real app (SQLite under a temporary home).

Studies are submitted through ``POST /studies``; their trials are told straight to Optuna's
storage with the user attributes a worker writes (metrics, epochs, radii), so no training runs.
:func:`populate` is shared with ``tests/e2e/test_browser.py``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
import pytest
from fastapi.testclient import TestClient
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from service.app import create_app
from service.config import Settings
from service.routers.pages import prefers_html
from tests.service.test_api_studies import DIGITS_SPEC
from worker.study._studies import load_study
from worker.trial._certificates import RadiiSummary

optuna.logging.set_verbosity(optuna.logging.WARNING)

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
JSON = {"Accept": "application/json"}
REPORT_EPS = (0.1, 0.25, 0.3, 0.5, 1.0)
TEST_POINTS = 360

_LOSS = CategoricalDistribution(["hkr", "tau_ce"])
_DISTRIBUTIONS = {
    "margin": FloatDistribution(0.01, 2.0, log=True),
    "alpha_kr": FloatDistribution(1.0, 1000.0, log=True),
    "temperature": FloatDistribution(0.1, 100.0, log=True),
}


def told_trial(number: int, rng: np.random.Generator) -> optuna.trial.FrozenTrial:
    """A completed trial as a worker leaves it: params of its loss family, objective values
    consistent with its radii, metrics, per-epoch log and radii summary.

    Accuracy falls and radii grow with ``number`` (a trade-off), with noise, so the front at
    one eps differs from the front at another.
    """
    family = ("hkr", "tau_ce")[number % 2]
    params: dict[str, Any] = {"loss": family}
    if family == "hkr":
        params["margin"] = float(np.exp(rng.uniform(np.log(0.01), np.log(2.0))))
        params["alpha_kr"] = float(np.exp(rng.uniform(0.0, np.log(1000.0))))
    else:
        params["temperature"] = float(np.exp(rng.uniform(np.log(0.1), np.log(100.0))))
    accuracy_target = 0.97 - 0.05 * number + rng.uniform(-0.03, 0.03)
    correct = rng.uniform(size=TEST_POINTS) < accuracy_target
    scale = 0.15 + 0.12 * number + rng.uniform(0.0, 0.2)
    radii = RadiiSummary.from_arrays(rng.exponential(scale, TEST_POINTS), correct)
    accuracy = float(correct.mean())
    metrics = {"accuracy": accuracy, "mean_certified_radius": float(radii.radii.mean())}
    for eps in REPORT_EPS:
        metrics[f"certified_accuracy_eps_{eps:g}"] = float(radii.certified_accuracy(eps))
    epochs = [
        {
            "epoch": epoch,
            "train_loss": 1.0 / epoch,
            "val_accuracy": accuracy * epoch / 5,
            "val_certified_accuracy_eps_0.3": metrics["certified_accuracy_eps_0.3"] * epoch / 5,
            "seconds": 0.5,
        }
        for epoch in range(1, 6)
    ]
    return optuna.trial.create_trial(
        params=params,
        distributions={"loss": _LOSS, **{k: _DISTRIBUTIONS[k] for k in params if k != "loss"}},
        values=[accuracy, metrics["certified_accuracy_eps_0.3"]],
        user_attrs={
            "liptune.metrics": metrics,
            "liptune.epochs": epochs,
            "liptune.radii": radii.encode(),
            "liptune.mlflow_run_id": f"run{number:04d}",
            "liptune.certificate_mode": "global",
        },
    )


def failed_trial(reason: str = "CUDA out of memory") -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        params={"loss": "hkr", "margin": 0.5, "alpha_kr": 10.0},
        distributions={
            "loss": _LOSS,
            "margin": _DISTRIBUTIONS["margin"],
            "alpha_kr": _DISTRIBUTIONS["alpha_kr"],
        },
        state=TrialState.FAIL,
        user_attrs={"liptune.failure_reason": reason},
    )


def populate(storage: Any, study_id: str, completed: int, failed: int = 0, seed: int = 0) -> None:
    """Tell ``completed`` trials (then ``failed`` failed ones) to the study ``study_id``."""
    study = load_study(storage, study_id)
    rng = np.random.default_rng(seed)
    for number in range(completed):
        study.add_trial(told_trial(number, rng))
    for _ in range(failed):
        study.add_trial(failed_trial())


def submit(client: Any, **changes: Any) -> str:
    """``POST /studies`` with the digits spec (``changes`` applied); the new study's id."""
    response = client.post("/studies", json={**DIGITS_SPEC, **changes}, headers=JSON)
    assert response.status_code == 201, response.text
    return response.json()["id"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    settings = Settings(home=tmp_path_factory.mktemp("home"), workers=0, cache_ttl_s=0.0)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def storage(client: TestClient) -> Any:
    return client.app.state.resources.storage


@pytest.fixture(scope="module")
def study_id(client: TestClient, storage: Any) -> str:
    study_id = submit(client, name="populated")
    populate(storage, study_id, completed=7, failed=1)
    return study_id


@pytest.fixture(scope="module")
def empty_study_id(client: TestClient) -> str:
    return submit(client, name="empty")


def figure(client: TestClient, path: str, **params: Any) -> dict[str, Any]:
    response = client.get(path, params=params, headers=JSON)
    assert response.status_code == 200, response.text
    return response.json()


def with_role(fig: dict[str, Any], role: str) -> list[dict[str, Any]]:
    return [trace for trace in fig["data"] if (trace.get("meta") or {}).get("role") == role]


# --------------------------------------------------------------------------- routing


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),
        ("text/html", True),
        ("application/json", False),
        ("*/*", False),
        ("", False),
        ("application/json, text/html;q=0.5", False),
        ("text/html;q=0", False),
        ("text/html;q=0.9, application/json;q=0.9", True),
    ],
)
def test_prefers_html_reads_the_accept_header(accept, html):
    assert prefers_html({"headers": [(b"accept", accept.encode())]}) is html


def test_a_browser_gets_the_study_page_and_an_api_client_gets_json(client, study_id):
    page = client.get(f"/studies/{study_id}", headers=HTML)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert f'data-study-id="{study_id}"' in page.text
    assert '<script src="/static/plotly.min.js">' in page.text

    for headers in (JSON, {"Accept": "*/*"}, {}):
        api = client.get(f"/studies/{study_id}", headers=headers)
        assert api.status_code == 200
        assert api.json()["id"] == study_id


def test_trial_page_and_trial_json_share_a_path(client, study_id):
    page = client.get(f"/studies/{study_id}/trials/2", headers=HTML)
    assert page.status_code == 200
    assert 'data-trial-number="2"' in page.text
    assert client.get(f"/studies/{study_id}/trials/2", headers=JSON).json()["number"] == 2


def test_studies_page_and_list(client, study_id):
    assert 'id="study-form"' in client.get("/", headers=HTML).text
    assert 'id="study-form"' in client.get("/studies", headers=HTML).text
    assert client.get("/studies", headers=JSON).json()["total"] >= 1


def test_unknown_study_or_trial_pages_are_404_pages(client, study_id):
    missing = client.get("/studies/0123456789abcdef0123456789abcdef", headers=HTML)
    assert missing.status_code == 404
    assert "There is no study" in missing.text
    assert client.get(f"/studies/{study_id}/trials/999", headers=HTML).status_code == 404


def test_static_files_and_plotly_from_the_installed_package(client):
    plotly_js = client.get("/static/plotly.min.js")
    assert plotly_js.status_code == 200
    assert "javascript" in plotly_js.headers["content-type"]
    assert len(plotly_js.content) > 1_000_000
    for name in ("style.css", "common.js", "studies.js", "study.js", "trial.js"):
        assert client.get(f"/static/{name}").status_code == 200, name
    assert client.get("/static/missing.js").status_code == 404


def test_pages_and_figures_stay_out_of_the_openapi_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths
    assert not [path for path in paths if "figures" in path or path.startswith("/static")]
    assert "/studies/{study_id}" in paths


# --------------------------------------------------------------------------- study figures


def test_pareto_figure_highlights_the_front_of_the_api(client, study_id):
    front = client.get(f"/studies/{study_id}/pareto", headers=JSON).json()["trials"]
    fig = figure(client, f"/studies/{study_id}/figures/pareto")
    (front_trace,) = with_role(fig, "front")
    assert sorted(front_trace["customdata"]) == sorted(t["number"] for t in front)
    drawn = sum(len(trace["x"]) for trace in with_role(fig, "family"))
    assert drawn == 7  # every completed trial; the failed one has no values
    assert {trace["name"] for trace in with_role(fig, "family")} == {"hkr", "tau_ce"}
    assert fig["layout"]["xaxis"]["title"]["text"] == "accuracy"


@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_pareto_figure_at_eps_matches_the_recomputed_front(client, study_id, eps):
    front = client.get(f"/studies/{study_id}/pareto", params={"eps": eps}, headers=JSON).json()
    key = f"certified_accuracy_eps_{eps:g}"
    expected = sorted((t["values"]["accuracy"], t["values"][key]) for t in front["trials"])
    fig = figure(client, f"/studies/{study_id}/figures/pareto", eps=eps)
    (front_trace,) = with_role(fig, "front")
    drawn = sorted(zip(front_trace["x"], front_trace["y"], strict=True))
    assert len(drawn) == len(expected)
    for point, wanted in zip(drawn, expected, strict=True):
        assert point == pytest.approx(wanted)
    assert fig["layout"]["meta"]["y_key"] == key


def test_front_positions_move_with_eps(client, study_id):
    low = with_role(figure(client, f"/studies/{study_id}/figures/pareto", eps=0.1), "front")[0]
    high = with_role(figure(client, f"/studies/{study_id}/figures/pareto", eps=1.0), "front")[0]
    assert max(high["y"]) < max(low["y"])


def test_requirement_filter_rings_the_trials_meeting_it_and_stars_the_recommended(client, study_id):
    minimum = 0.3
    fig = figure(
        client, f"/studies/{study_id}/figures/pareto", eps=0.5, min_certified_accuracy=minimum
    )
    meta = fig["layout"]["meta"]
    records = {
        t["number"]: t
        for t in client.get(f"/studies/{study_id}/trials", params={"size": 100}).json()["items"]
    }
    meeting = [
        n
        for n, t in records.items()
        if t["metrics"].get("certified_accuracy_eps_0.5", 0) >= minimum
    ]
    assert meeting, "the fixture should have trials meeting the requirement"
    assert sorted(meta["meeting"]) == sorted(meeting)
    assert sorted(with_role(fig, "meeting")[0]["customdata"]) == sorted(meeting)
    api = client.get(
        f"/studies/{study_id}/recommend",
        params={"eps": 0.5, "min_certified_accuracy": minimum},
        headers=JSON,
    ).json()
    assert meta["recommendation"]["trial"] == api["trial"]["number"]
    assert with_role(fig, "recommended")[0]["customdata"] == [api["trial"]["number"]]


def test_an_unmet_requirement_names_the_closest_trial(client, study_id):
    fig = figure(
        client, f"/studies/{study_id}/figures/pareto", eps=1.0, min_certified_accuracy=0.99
    )
    recommendation = fig["layout"]["meta"]["recommendation"]
    assert recommendation["trial"] is None
    assert recommendation["closest"] is not None
    assert not with_role(fig, "recommended")
    assert not with_role(fig, "meeting")


def test_certified_accuracy_curves_are_those_of_the_front(client, study_id):
    front = client.get(f"/studies/{study_id}/pareto", params={"eps": 0.3}, headers=JSON).json()
    fig = figure(client, f"/studies/{study_id}/figures/certified-accuracy", eps=0.3)
    curves = with_role(fig, "curve")
    assert sorted(c["meta"]["trial"] for c in curves) == sorted(
        t["number"] for t in front["trials"]
    )
    for curve in curves:
        assert curve["y"][0] >= curve["y"][-1]  # certified accuracy never grows with eps
    assert fig["layout"]["shapes"][0]["x0"] == 0.3


def test_optuna_figures_of_a_populated_study(client, study_id):
    hypervolume = figure(client, f"/studies/{study_id}/figures/hypervolume")
    assert len(hypervolume["data"][0]["x"]) == 7  # one point per completed trial
    importance = figure(client, f"/studies/{study_id}/figures/importance")
    assert len(importance["data"]) == 2  # one bar group per objective
    parallel = figure(
        client,
        f"/studies/{study_id}/figures/parallel-coordinates",
        objective="certified_accuracy_eps_0.3",
    )
    assert parallel["layout"]["xaxis"]["ticktext"][0] == "certified accuracy (eps = 0.3)"


@pytest.mark.parametrize(
    "name", ["pareto", "certified-accuracy", "hypervolume", "importance", "parallel-coordinates"]
)
def test_figures_of_an_empty_study_explain_why_they_are_empty(client, empty_study_id, name):
    fig = figure(client, f"/studies/{empty_study_id}/figures/{name}")
    assert fig["layout"]["meta"]["empty"]
    assert fig["data"] == []


def test_figure_errors_are_problems(client, study_id):
    unknown_study = client.get("/studies/0123456789abcdef0123456789abcdef/figures/pareto")
    assert unknown_study.status_code == 404
    assert unknown_study.headers["content-type"] == "application/problem+json"
    unknown_figure = client.get(f"/studies/{study_id}/figures/nope")
    assert unknown_figure.status_code == 404
    assert "pareto" in unknown_figure.json()["detail"]
    bad_objective = client.get(
        f"/studies/{study_id}/figures/parallel-coordinates", params={"objective": "loss"}
    )
    assert bad_objective.status_code == 422
    assert bad_objective.json()["errors"][0]["field"] == "query.objective"
    bad_eps = client.get(f"/studies/{study_id}/figures/pareto", params={"eps": -1})
    assert bad_eps.status_code == 422


# --------------------------------------------------------------------------- trial figures


def test_training_curves_and_radii_of_a_completed_trial(client, study_id):
    curves = figure(client, f"/studies/{study_id}/trials/3/figures/training-curves")
    assert [t["meta"]["role"] for t in curves["data"]] == ["accuracy", "accuracy", "loss"]
    assert curves["data"][0]["x"] == [1, 2, 3, 4, 5]
    radii = figure(client, f"/studies/{study_id}/trials/3/figures/radii")
    (histogram,) = radii["data"]
    accuracy = client.get(f"/studies/{study_id}/trials/3", headers=JSON).json()["metrics"][
        "accuracy"
    ]
    assert len(histogram["x"]) == round(accuracy * TEST_POINTS)
    assert len(radii["layout"]["shapes"]) == len(REPORT_EPS)


def test_figures_of_a_failed_trial_say_why_they_are_empty(client, study_id):
    radii = figure(client, f"/studies/{study_id}/trials/7/figures/radii")
    assert "FAIL" in radii["layout"]["meta"]["empty"]
    curves = figure(client, f"/studies/{study_id}/trials/7/figures/training-curves")
    assert "ended (FAIL) before its first epoch" in curves["layout"]["meta"]["empty"]
    assert client.get(f"/studies/{study_id}/trials/99/figures/radii").status_code == 404


def test_inf_alpha_kr_survives_the_figure_json(client, storage):
    study_id = submit(
        client,
        name="hinge-only",
        search_space={
            "loss": ["hkr"],
            "margin": {"low": 0.01, "high": 2.0},
            "alpha_kr": [10.0, "Infinity"],
        },
    )
    trial = told_trial(0, np.random.default_rng(1))
    trial.params["alpha_kr"] = math.inf
    trial.distributions["alpha_kr"] = CategoricalDistribution([10.0, math.inf])
    load_study(storage, study_id).add_trial(trial)
    fig = figure(client, f"/studies/{study_id}/figures/pareto")
    assert "alpha_KR: ∞" in with_role(fig, "family")[0]["text"][0]


def test_page_and_recommend_default_to_the_same_eps_and_trial(client, storage):
    """Without an eps, the page's recommendation and ``/recommend`` answer at the same eps
    (here: no certified-accuracy objective, the reporting list unsorted) with the same trial."""
    study_id = submit(
        client,
        name="default-eps",
        objectives=[{"metric": "accuracy"}, {"metric": "mean_certified_radius"}],
        eps=[0.5, 0.1, 0.25],
    )
    populate(storage, study_id, completed=8, seed=3)
    fig = figure(client, f"/studies/{study_id}/figures/pareto", min_certified_accuracy=0.2)
    page = fig["layout"]["meta"]["recommendation"]
    api = client.get(
        f"/studies/{study_id}/recommend", params={"min_certified_accuracy": 0.2}, headers=JSON
    ).json()
    assert api["eps"] == 0.1
    assert page["minimums"] == {"certified_accuracy_eps_0.1": 0.2}
    assert page["trial"] == api["trial"]["number"]
