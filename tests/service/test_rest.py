"""REST conventions a generic HTTP client relies on: 201 for a registration's creation, Link
headers on pages, ETag / If-None-Match -> 304, readable operation ids, described tags."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.service.test_pages import JSON, populate, submit


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    settings = Settings(home=tmp_path_factory.mktemp("home"), workers=0, cache_ttl_s=0.0)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def study_id(client: TestClient) -> str:
    study_id = submit(client, name="rest")
    populate(client.app.state.resources.storage, study_id, completed=7)
    return study_id


def links(response) -> dict[str, str]:
    return {
        rel: url for url, rel in re.findall(r'<([^>]+)>; rel="(\w+)"', response.headers["Link"])
    }


def test_pages_of_trials_link_to_their_neighbours(client: TestClient, study_id: str) -> None:
    first = client.get(f"/studies/{study_id}/trials", params={"size": 3, "state": "COMPLETE"})
    assert first.status_code == 200
    rels = links(first)
    assert set(rels) == {"first", "next", "last"}
    assert "state=COMPLETE" in rels["next"] and "page=2" in rels["next"]
    assert "page=3" in rels["last"]
    second = client.get(rels["next"])
    assert [t["number"] for t in second.json()["items"]] == [3, 4, 5]
    assert set(links(second)) == {"first", "prev", "next", "last"}
    last = client.get(rels["last"])
    assert set(links(last)) == {"first", "prev", "last"}
    assert [t["number"] for t in last.json()["items"]] == [6]


def test_reads_answer_304_to_the_etag_they_sent(client: TestClient, study_id: str) -> None:
    for path in (
        f"/studies/{study_id}",
        f"/studies/{study_id}/pareto?eps=0.5",
        f"/studies/{study_id}/trials",
        f"/studies/{study_id}/trials/2",
        "/studies",
    ):
        response = client.get(path, headers=JSON)
        assert response.status_code == 200, path
        etag = response.headers["ETag"]
        again = client.get(path, headers={**JSON, "If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"", path
        assert again.headers["ETag"] == etag
        other = client.get(path, headers={**JSON, "If-None-Match": '"stale"'})
        assert other.status_code == 200 and other.content == response.content


def test_the_etag_changes_when_the_study_does(client: TestClient, study_id: str) -> None:
    path = f"/studies/{study_id}/trials"
    before = client.get(path).headers["ETag"]
    populate(client.app.state.resources.storage, study_id, completed=1, seed=9)
    after = client.get(path, headers={"If-None-Match": before})
    assert after.status_code == 200 and after.headers["ETag"] != before


def test_openapi_names_operations_and_describes_tags(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    ids = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    assert {"submit_study", "get_study", "list_trials", "register", "recommend"} <= ids
    assert all(re.fullmatch(r"[a-z_]+", op_id) for op_id in ids)
    described = {tag["name"]: tag["description"] for tag in spec["tags"]}
    used = {t for path in spec["paths"].values() for op in path.values() for t in op["tags"]}
    assert used <= set(described) and all(described.values())
    register = spec["paths"]["/studies/{study_id}/trials/{number}/register"]["post"]
    assert "201" in register["responses"]
