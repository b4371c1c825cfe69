"""API tests of study submission: validation, limits, idempotency, listing, auth, CORS.

Every rejected request must answer problem+json naming the field and leave both the service
table and Optuna's storage untouched.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings, hash_api_key

DIGITS_SPEC: dict[str, Any] = {
    "name": "digits-tradeoff",
    "dataset": {"name": "digits"},
    "model": {"name": "mlp", "widths": [64, 64]},
    "training": {"epochs": 5, "batch_size": 128, "lr": 0.005},
    "search_space": {
        "loss": ["hkr", "tau_ce"],
        "margin": {"low": 0.01, "high": 2.0, "log": True},
        "alpha_kr": {"low": 1.0, "high": 1000.0, "log": True},
        "temperature": {"low": 0.1, "high": 100.0, "log": True},
    },
    "objectives": [{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.3}],
    "n_trials": 8,
    "seed": 0,
}
PROBLEM = "application/problem+json"


def make_client(home: Path, storage_url: str, **settings: Any) -> TestClient:
    app = create_app(Settings(home=home, storage_url=storage_url, cache_ttl_s=0, **settings))
    return TestClient(app)


@pytest.fixture
def client(tmp_path: Path, storage_url: str) -> TestClient:
    return make_client(tmp_path, storage_url, max_trials=100, max_epochs=50)


def stored(client: TestClient) -> tuple[int, int]:
    """(rows in liptune_studies, Optuna studies)."""
    resources = client.app.state.resources
    with resources.engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT count(*) FROM liptune_studies")).scalar_one()
    return rows, len(optuna.get_all_study_summaries(resources.storage))


def with_changes(**changes: Any) -> dict[str, Any]:
    """DIGITS_SPEC with dotted-path changes, e.g. ``{"training.epochs": 9}``; None deletes."""
    return changed(DIGITS_SPEC, **changes)


def changed(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of the spec ``base`` with dotted-path changes; None deletes."""
    spec = copy.deepcopy(base)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = spec
        for part in parents:
            node = node[part]
        if value is None:
            node.pop(leaf)
        else:
            node[leaf] = value
    return spec


def test_submit_returns_201_with_id_urls_and_the_optuna_study(client: TestClient):
    response = client.post("/studies", json=DIGITS_SPEC)
    assert response.status_code == 201, response.text
    body = response.json()
    assert len(body["id"]) == 32 and body["status"] == "running"
    assert body["urls"]["pareto"] == f"/studies/{body['id']}/pareto"
    assert response.headers["location"] == f"/studies/{body['id']}"
    assert body["objectives"][1]["key"] == "certified_accuracy_eps_0.3"
    assert body["counts"]["COMPLETE"] == 0 and body["n_trials"] == 8
    study = optuna.load_study(
        study_name=f"liptune-{body['id']}", storage=client.app.state.resources.storage
    )
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    assert client.get(f"/studies/{body['id']}").json()["spec"]["n_trials"] == 8


BAD_SPECS = [
    ({"dataset.name": "imagenet"}, "body.dataset.name", "unknown value 'imagenet'"),
    ({"model.name": "transformer"}, "body.model", "unknown"),
    ({"search_space.loss": ["hkr", "focal"]}, "body.search_space.loss", "unknown value 'focal'"),
    (
        {"search_space.margin": {"low": 2.0, "high": 0.5}},
        "body.search_space.margin",
        "low (2.0) must be < high (0.5)",
    ),
    (
        {"search_space.temperature": {"low": 0.0, "high": 10.0, "log": True}},
        "body.search_space.temperature",
        "a log range needs low > 0",
    ),
    ({"n_trials": 101}, "body.n_trials", "limit of 100"),
    ({"training.epochs": 51}, "body.training.epochs", "limit of 50"),
    ({"n_trials": 0}, "body.n_trials", "greater than or equal to 1"),
    ({"objectives": [{"metric": "certified_accuracy"}]}, "body.objectives.0", "needs an eps"),
    ({"name": None}, "body.name", "Field required"),
]


@pytest.mark.parametrize(("changes", "field", "reason"), BAD_SPECS)
def test_bad_spec_is_a_422_problem_naming_the_field_and_stores_nothing(
    client: TestClient, changes: dict[str, Any], field: str, reason: str
):
    before = stored(client)
    response = client.post("/studies", json=with_changes(**changes))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == 422 and problem["title"] == "Unprocessable Entity"
    assert any(e["field"].startswith(field) and reason in e["reason"] for e in problem["errors"]), (
        problem
    )
    assert field in problem["detail"] or problem["errors"][0]["field"] in problem["detail"]
    assert stored(client) == before


def test_malformed_json_and_oversized_body_store_nothing(tmp_path: Path, sqlite_url: str):
    client = make_client(tmp_path, sqlite_url, max_body_bytes=2048)
    before = stored(client)
    response = client.post(
        "/studies", content=b'{"name": "x", ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.headers["content-type"] == PROBLEM
    assert response.json()["errors"][0]["field"] == "body"
    assert "not valid JSON" in response.json()["detail"]
    padded = with_changes(name="x" * 100)
    padded["baselines"] = [{"loss": "kr"}] * 200
    response = client.post("/studies", json=padded)
    assert response.status_code == 413 and response.headers["content-type"] == PROBLEM
    assert "2048 bytes" in response.json()["detail"]
    assert stored(client) == before


def test_unknown_study_is_a_404_problem(client: TestClient):
    for path in ("/studies/0123", "/studies/0123/pareto", "/studies/0123/trials/0"):
        response = client.get(path)
        assert response.status_code == 404 and response.headers["content-type"] == PROBLEM
        assert "0123" in response.json()["detail"]
    response = client.post("/studies/0123/cancel")
    assert response.status_code == 404


def test_idempotency_key_replays_the_same_study_and_rejects_another_body(client: TestClient):
    headers = {"Idempotency-Key": "submit-1"}
    first = client.post("/studies", json=DIGITS_SPEC, headers=headers)
    again = client.post("/studies", json=DIGITS_SPEC, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    before = stored(client)
    other = client.post("/studies", json=with_changes(n_trials=9), headers=headers)
    assert other.status_code == 422 and other.headers["content-type"] == PROBLEM
    assert other.json()["errors"][0]["field"] == "header.Idempotency-Key"
    assert stored(client) == before == (1, 1)
    assert client.post("/studies", json=DIGITS_SPEC).json()["id"] != first.json()["id"]


def test_listing_is_paginated_and_filtered_by_status(client: TestClient):
    ids = [client.post("/studies", json=with_changes(name=f"s{i}")).json()["id"] for i in range(5)]
    page = client.get("/studies", params={"size": 2, "page": 1}).json()
    assert (page["total"], page["pages"], page["size"], len(page["items"])) == (5, 3, 2, 2)
    assert page["items"][0]["name"] == "s4"  # newest first
    last = client.get("/studies", params={"size": 2, "page": 3}).json()
    assert [item["name"] for item in last["items"]] == ["s0"]
    assert client.post(f"/studies/{ids[1]}/cancel").json()["status"] == "cancelled"
    cancelled = client.get("/studies", params={"status": "cancelled"}).json()
    assert [item["id"] for item in cancelled["items"]] == [ids[1]]
    assert client.get("/studies", params={"status": "running"}).json()["total"] == 4
    bad = client.get("/studies", params={"status": "paused"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "query.status"
    bad = client.get("/studies", params={"size": 0})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "query.size"


def test_cancel_twice_is_a_conflict_and_extend_reopens(client: TestClient):
    study_id = client.post("/studies", json=DIGITS_SPEC).json()["id"]
    assert client.post(f"/studies/{study_id}/cancel").status_code == 200
    again = client.post(f"/studies/{study_id}/cancel")
    assert again.status_code == 409 and "cancelled" in again.json()["detail"]
    extended = client.post(f"/studies/{study_id}/extend", json={"n_trials": 4})
    assert extended.status_code == 200
    assert (extended.json()["status"], extended.json()["n_trials"]) == ("running", 12)
    assert extended.json()["spec"]["n_trials"] == 12
    over = client.post(f"/studies/{study_id}/extend", json={"n_trials": 89})
    assert over.status_code == 422 and over.json()["errors"][0]["field"] == "body.n_trials"
    zero = client.post(f"/studies/{study_id}/extend", json={"n_trials": 0})
    assert zero.status_code == 422 and zero.json()["errors"][0]["field"] == "body.n_trials"


def test_api_keys_protect_writes_and_optionally_reads(tmp_path: Path, sqlite_url: str):
    key = "s3cret-key"
    client = make_client(tmp_path, sqlite_url, api_key_hashes=[hash_api_key(key)])
    denied = client.post("/studies", json=DIGITS_SPEC)
    assert denied.status_code == 401 and denied.headers["content-type"] == PROBLEM
    assert denied.headers["www-authenticate"] == "Bearer"
    wrong = client.post("/studies", json=DIGITS_SPEC, headers={"X-API-Key": "s3cret-kez"})
    assert wrong.status_code == 401
    assert stored(client) == (0, 0)
    created = client.post("/studies", json=DIGITS_SPEC, headers={"X-API-Key": key})
    assert created.status_code == 201
    bearer = client.post(
        f"/studies/{created.json()['id']}/cancel", headers={"Authorization": f"Bearer {key}"}
    )
    assert bearer.status_code == 200
    assert client.get("/studies").status_code == 200  # reads open by default

    closed = make_client(
        tmp_path, sqlite_url, api_key_hashes=[hash_api_key(key)], protect_reads=True
    )
    assert closed.get("/studies").status_code == 401
    assert closed.get("/studies", headers={"X-API-Key": key}).status_code == 200
    assert closed.get("/health").status_code == 200


def test_settings_reject_plain_keys_and_read_a_config_file(tmp_path: Path, monkeypatch):
    with pytest.raises(ValueError, match="never plain keys"):
        Settings(api_key_hashes=["my-plain-key"])
    config = tmp_path / "liptune.yaml"
    config.write_text("max_trials: 7\ncors_origins: ['http://a.example']\nport: 9000\n")
    monkeypatch.setenv("LIPTUNE_PORT", "9100")
    settings = Settings(config_file=config, home=tmp_path)
    assert (settings.max_trials, settings.cors_origins) == (7, ["http://a.example"])
    assert settings.port == 9100  # the environment beats the file
    assert Settings(config_file=config, port=9200).port == 9200  # flags beat both


def test_cors_is_off_unless_origins_are_configured(tmp_path: Path, sqlite_url: str):
    preflight = {"Origin": "http://a.example", "Access-Control-Request-Method": "POST"}
    off = make_client(tmp_path, sqlite_url)
    assert "access-control-allow-origin" not in off.options("/studies", headers=preflight).headers
    on = make_client(tmp_path, sqlite_url, cors_origins=["http://a.example"])
    answer = on.options("/studies", headers=preflight)
    assert answer.headers["access-control-allow-origin"] == "http://a.example"


def test_catalog_health_and_metrics(client: TestClient):
    datasets = client.get("/datasets").json()
    digits = next(item for item in datasets["items"] if item["name"] == "digits")
    assert digits["available"] is True and digits["num_classes"] == 10
    assert datasets["fields"]["validation_fraction"]["default"] == 0.1
    models = client.get("/models").json()
    mlp = next(item for item in models["items"] if item["name"] == "mlp")
    assert mlp["fields"]["widths"]["default"] == [128, 128]
    assert models["training"]["epochs"]["minimum"] == 1
    losses = {item["name"]: item for item in client.get("/losses").json()["items"]}
    assert set(losses["hkr"]["params"]) == {"margin", "alpha_kr"}
    assert losses["tau_ce"]["params"]["temperature"]["log"] is True
    offset = losses["offset_ce"]
    assert set(offset["params"]) == {"margin", "temperature"}
    assert offset["tasks"] == ["binary", "multiclass"]
    assert "1 / tau" in offset["params"]["temperature"]["description"]
    assert client.get("/health").json() == {"status": "ok"}
    client.post("/studies", json=DIGITS_SPEC)
    metrics = client.get("/metrics").text
    assert 'liptune_studies{status="running"} 1.0' in metrics
    assert "liptune_queue_depth 8.0" in metrics
    assert 'http_requests_total{handler="/studies"' in metrics


def test_openapi_documents_problem_responses(client: TestClient):
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/studies"]["post"]
    assert "4XX" in post["responses"]
    assert PROBLEM in post["responses"]["4XX"]["content"]
    assert json.dumps(schema)  # no non-finite number in the schema
