"""``protect_reads``: every read needs a key, the figures and ``/metrics`` included; what stays
open is exactly the liveness/readiness probes, the API's own description and the page shells
with their static code, none of which holds study data."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings, hash_api_key
from tests.service.test_api_studies import DIGITS_SPEC
from tests.service.test_pages import populate

KEY = "reader-key"
HTML = {"Accept": "text/html"}
JSON = {"Accept": "application/json"}

#: Reads that hold study data or service state: 401 without a key.
PROTECTED = [
    "/studies",
    "/studies/{study_id}",
    "/studies/{study_id}/pareto",
    "/studies/{study_id}/recommend",
    "/studies/{study_id}/trials",
    "/studies/{study_id}/trials/{number}",
    "/studies/{study_id}/trials/{number}/model",
    "/studies/{study_id}/figures/{name}",
    "/studies/{study_id}/trials/{number}/figures/{name}",
    "/datasets",
    "/models",
    "/samplers",
    "/losses",
    "/metrics",
]
#: Open by design (README, "API keys"): probes, the API description, static code.
OPEN = ["/health", "/ready", "/openapi.json", "/docs", "/redoc", "/static/plotly.min.js"]
#: Browser navigations (no key can ride on them): shells whose data comes from the API.
PAGES = ["/", "/studies", "/studies/{study_id}", "/studies/{study_id}/trials/{number}"]


def client_for(home: Path, protect_reads: bool) -> TestClient:
    settings = Settings(
        home=home,
        workers=0,
        cache_ttl_s=0.0,
        mlflow_uri="none",
        api_key_hashes=[hash_api_key(KEY)],
        protect_reads=protect_reads,
    )
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def closed(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, str]:
    client = client_for(tmp_path_factory.mktemp("home"), protect_reads=True)
    created = client.post("/studies", json=DIGITS_SPEC, headers={"X-API-Key": KEY, **JSON})
    assert created.status_code == 201, created.text
    study_id = created.json()["id"]
    populate(client.app.state.resources.storage, study_id, completed=3)
    return client, study_id


def url(path: str, study_id: str, name: str = "pareto") -> str:
    return path.format(study_id=study_id, number=0, name=name)


def figure_name(path: str) -> str:
    return "radii" if "trials/{number}/figures" in path else "pareto"


@pytest.mark.parametrize("path", PROTECTED)
def test_every_read_needs_the_key(closed: tuple[TestClient, str], path: str):
    client, study_id = closed
    target = url(path, study_id, figure_name(path))
    denied = client.get(target, headers=JSON)
    assert denied.status_code == 401, (target, denied.status_code, denied.text[:200])
    assert denied.headers["www-authenticate"] == "Bearer"
    assert client.get(target, headers={"X-API-Key": "wrong", **JSON}).status_code == 401
    allowed = client.get(target, headers={"X-API-Key": KEY, **JSON})
    assert allowed.status_code != 401, (target, allowed.text[:200])
    if path == "/metrics":
        assert "liptune_studies" in allowed.text


@pytest.mark.parametrize("path", OPEN)
def test_probes_the_api_description_and_static_code_stay_open(
    closed: tuple[TestClient, str], path: str
):
    client, _ = closed
    assert client.get(path).status_code in (200, 503)  # /ready: 503 means not ready, not denied


def test_the_lists_cover_every_get_route_of_the_schema(closed: tuple[TestClient, str]):
    client, _ = closed
    schema = client.get("/openapi.json").json()
    documented = {path for path, item in schema["paths"].items() if "get" in item}
    assert documented <= set(PROTECTED) | set(OPEN), documented - set(PROTECTED) - set(OPEN)


@pytest.mark.parametrize("path", PAGES)
def test_pages_are_data_free_shells_that_do_not_reveal_what_exists(
    closed: tuple[TestClient, str], path: str
):
    client, study_id = closed
    real = client.get(url(path, study_id), headers=HTML)
    made_up = client.get(url(path, "no-such-study"), headers=HTML)
    assert real.status_code == made_up.status_code == 200
    assert real.text.replace(study_id, "no-such-study") == made_up.text
    assert DIGITS_SPEC["name"] not in real.text


def test_without_protect_reads_the_same_reads_are_open(tmp_path: Path):
    client = client_for(tmp_path, protect_reads=False)
    for path in ("/studies", "/datasets", "/metrics"):
        assert client.get(path, headers=JSON).status_code == 200, path
    missing = client.get("/studies/no-such-study", headers=HTML)
    assert missing.status_code == 404  # open pages may say what exists
