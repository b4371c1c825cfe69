"""Concurrent writes to one study: none is lost, none answered with a 4xx/5xx it should not be.

Twenty ``extend`` calls of +1 at once must give +20 (in the service table and in the spec the
workers read from Optuna), and concurrent retries of one submission with one Idempotency-Key
must all get the one study, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
from fastapi.testclient import TestClient

from tests.service.test_api_studies import DIGITS_SPEC, make_client, stored
from worker.study._studies import load_spec, optuna_study_name

EXTENDS = 20


def test_concurrent_extends_all_count(tmp_path: Path, storage_url: str):
    client = make_client(tmp_path, storage_url)
    study_id = client.post("/studies", json=DIGITS_SPEC).json()["id"]
    with ThreadPoolExecutor(EXTENDS) as pool:
        responses = list(
            pool.map(
                lambda _: client.post(f"/studies/{study_id}/extend", json={"n_trials": 1}),
                range(EXTENDS),
            )
        )
    assert [r.status_code for r in responses] == [200] * EXTENDS, [r.text for r in responses]
    expected = DIGITS_SPEC["n_trials"] + EXTENDS
    assert client.get(f"/studies/{study_id}").json()["n_trials"] == expected
    storage = client.app.state.resources.storage
    study = optuna.load_study(study_name=optuna_study_name(study_id), storage=storage)
    assert load_spec(study).n_trials == expected
    assert client.get(f"/studies/{study_id}").json()["spec"]["n_trials"] == expected


def test_concurrent_retries_with_one_idempotency_key_get_the_one_study(
    tmp_path: Path, storage_url: str
):
    client: TestClient = make_client(tmp_path, storage_url)
    headers = {"Idempotency-Key": "retry-storm-1"}
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda _: client.post("/studies", json=DIGITS_SPEC, headers=headers), range(8))
        )
    assert [r.status_code for r in responses] == [201] * 8, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert stored(client) == (1, 1)
