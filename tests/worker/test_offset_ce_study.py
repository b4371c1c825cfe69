"""The field's training recipe over REST: studies of ``offset_ce`` with augmentation complete
on digits with a conv net (multiclass and a binary pair of classes), and augmentation of data
that are not images is refused with a 422 naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from worker.loop import Worker, WorkerOptions

AUGMENT = {"random_crop": 2, "horizontal_flip": True}
CONV = {"name": "convnet", "channels": [8], "dense_widths": [16], "pooling": "invertible"}


def study_spec(**changes: Any) -> dict[str, Any]:
    return {
        "name": "offset-ce",
        "dataset": {"name": "digits"},
        "model": CONV,
        "training": {
            "epochs": 1,
            "batch_size": 64,
            "lr": 0.01,
            "device": "cpu",
            "augment": AUGMENT,
        },
        "search_space": {
            "loss": "offset_ce",
            "margin": {"low": 0.05, "high": 1.0, "log": True},
            "temperature": {"low": 1.0, "high": 50.0, "log": True},
        },
        "objectives": [{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.1}],
        "eps": [0.1],
        "n_trials": 2,
        "seed": 0,
        **changes,
    }


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(home=tmp_path_factory.mktemp("home"), workers=0, cache_ttl_s=0.0)


@pytest.fixture(scope="module")
def client(settings: Settings) -> TestClient:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def run_study(client: TestClient, settings: Settings, spec: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/studies", json=spec)
    assert response.status_code == 201, response.text
    study_id = response.json()["id"]
    options = WorkerOptions(
        storage_url=settings.resolved_storage_url(), threads=1, device="cpu", exit_when_idle=True
    )
    assert Worker(options).run() == spec["n_trials"]
    study = client.get(f"/studies/{study_id}").json()
    trials = client.get(f"/studies/{study_id}/trials").json()["items"]
    return {"study": study, "trials": trials}


@pytest.mark.parametrize(
    "dataset", [{"name": "digits"}, {"name": "digits", "classes": [3, 8]}], ids=["10", "3v8"]
)
def test_an_offset_ce_study_with_augmentation_completes(client, settings, dataset):
    done = run_study(client, settings, study_spec(dataset=dataset))
    assert done["study"]["status"] == "completed", done["study"]
    assert done["study"]["spec"]["training"]["augment"] == AUGMENT
    assert len(done["trials"]) == 2
    for trial in done["trials"]:
        assert trial["state"] == "COMPLETE", trial
        assert trial["params"]["loss"] == "offset_ce"  # recorded, though never suggested
        assert {"margin", "temperature"} <= set(trial["params"])
        assert 0.0 <= trial["metrics"]["accuracy"] <= 1.0


def test_augmenting_two_moons_is_refused_with_a_422_naming_the_field(client):
    spec = study_spec(dataset={"name": "two-moons"}, model={"name": "mlp", "widths": [16]})
    stored = client.get("/studies").json()["items"]
    response = client.post("/studies", json=spec)
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert [error["field"] for error in errors] == ["body.training.augment"]
    assert "shape (2,)" in errors[0]["reason"]
    assert client.get("/studies").json()["items"] == stored  # nothing stored
    without = {**spec["training"]}
    without.pop("augment")
    assert client.post("/studies", json={**spec, "training": without}).status_code == 201
