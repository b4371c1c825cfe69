"""Submissions under load, through a real ``liptune serve`` (embedded SQLite) whose worker trains.

Twenty concurrent retries of one ``Idempotency-Key`` and ten distinct submissions race while the
worker writes its trial's records and another process holds SQLite's write lock for longer than
the connection pool's 30 s timeout: every retry is answered from the idempotency record with the
one study, every distinct submission gets its own, and nothing is a 5xx. Before, each
submission queued on the write lock while holding a pooled connection (5 + 10), the sixteenth
timed out waiting for the pool, and that overload was reported as an unreachable database.
"""

from __future__ import annotations

import copy
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_serve_e2e import running_serve, wait_until
from tests.service.test_api_studies import DIGITS_SPEC

pytestmark = pytest.mark.slow
#: Longer than SQLAlchemy's pool timeout (30 s), shorter than SQLite's busy timeout (120 s).
LOCK_HELD_S = 34.0


@pytest.fixture
def serving(tmp_path: Path):
    home, log = tmp_path / "home", tmp_path / "serve.log"
    with running_serve(home, log, "--workers", "1") as client:
        yield client, log, home / "liptune.db"


def test_concurrent_retries_and_submissions_while_a_worker_trains(serving):
    client, log, database = serving
    training = copy.deepcopy(DIGITS_SPEC) | {"name": "busy", "n_trials": 4}
    assert client.post("/studies", json=training).status_code == 201

    def running_trial():
        trials = client.get("/studies", params={"size": 5}).json()["items"][0]["counts"]
        return trials.get("RUNNING", 0) > 0

    wait_until(running_trial, 120, "the worker did not start training", log)
    spec = copy.deepcopy(DIGITS_SPEC) | {"name": "retried"}

    def retry(_: int) -> httpx.Response:
        return client.post("/studies", json=spec, headers={"Idempotency-Key": "one-key"})

    def distinct(index: int) -> httpx.Response:
        return client.post("/studies", json=spec | {"name": f"distinct-{index}"})

    locked, release = threading.Event(), threading.Event()

    def hold_the_write_lock() -> None:
        connection = sqlite3.connect(database, timeout=120, isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(LOCK_HELD_S)
        connection.execute("COMMIT")
        connection.close()

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    locked.wait(30)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=30) as pool:
        pending_retries = [pool.submit(retry, index) for index in range(20)]
        pending_others = [pool.submit(distinct, index) for index in range(10)]
        time.sleep(LOCK_HELD_S)
        release.set()
        retries = [future.result() for future in pending_retries]
        others = [future.result() for future in pending_others]
    holder.join()
    assert time.monotonic() - started >= LOCK_HELD_S
    statuses = [response.status_code for response in retries + others]
    assert statuses == [201] * 30, [(r.status_code, r.text[:200]) for r in retries + others]
    assert len({response.json()["id"] for response in retries}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in retries) == 19
    assert len({response.json()["id"] for response in others}) == 10
    listed = client.get("/studies", params={"size": 50}).json()
    names = sorted(item["name"] for item in listed["items"])
    assert names == sorted(["busy", "retried", *(f"distinct-{i}" for i in range(10))])
    assert "unreachable" not in log.read_text()
