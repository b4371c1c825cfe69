"""liptune studies are plain Optuna studies; claims keep their budget exact (SQLite, PostgreSQL)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa

from service.migrations import upgrade
from worker.search._space import suggest_params
from worker.study import _claims as claims
from worker.study._engine import open_storage, transaction_engine
from worker.study._studies import (
    cancel_study,
    create_study,
    load_spec,
    optuna_study_name,
    running_studies,
    set_budget,
    study_status,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_plain_optuna_opens_a_liptune_study(
    storage_url: str, tiny_study_spec: Callable[..., Any]
) -> None:
    spec = tiny_study_spec(
        search_space={"loss": "hkr", "alpha_kr": [1.0, math.inf]},
        objectives=[{"metric": "certified_accuracy", "eps": 0.3}, {"metric": "training_time"}],
        baselines=[{"loss": "cosine"}, {"loss": "hkr", "alpha_kr": math.inf}],
    )
    create_study(open_storage(storage_url), spec, "a1b2")

    study = optuna.load_study(study_name="liptune-a1b2", storage=storage_url)
    assert study.directions == [
        optuna.study.StudyDirection.MAXIMIZE,
        optuna.study.StudyDirection.MINIMIZE,
    ]
    assert study.user_attrs["liptune.id"] == "a1b2"
    assert study.user_attrs["liptune.status"] == "running"
    assert study.user_attrs["liptune.spec"]["search_space"]["alpha_kr"] == [1.0, "Infinity"]
    assert study.user_attrs["liptune.created_at"].endswith("+00:00")
    assert load_spec(study).search_space == spec.search_space
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [trial.system_attrs["fixed_params"] for trial in waiting] == [
        {"loss": "cosine"},
        {"loss": "hkr", "alpha_kr": math.inf},
    ]
    trial = study.ask()  # the first baseline comes first
    assert suggest_params(trial, spec.search_space) == {"loss": "cosine"}


def test_a_grid_that_cannot_be_built_stores_nothing(
    sqlite_url: str, tiny_study_spec: Callable[..., Any]
) -> None:
    spec = tiny_study_spec(sampler="grid")  # ranges and two families
    with pytest.raises(ValueError, match="grid sampler searches one loss family"):
        create_study(sqlite_url, spec, "bad")
    assert optuna.get_all_study_names(sqlite_url) == []


def test_status_cancel_extend_and_the_order_of_running_studies(
    storage_url: str, tiny_study_spec: Callable[..., Any]
) -> None:
    storage = open_storage(storage_url)
    for study_id in ("older", "newer", "newest"):
        create_study(storage, tiny_study_spec(n_trials=3), study_id)
        time.sleep(0.002)  # distinct creation times
    assert [study_id for study_id, _ in running_studies(storage)] == ["older", "newer", "newest"]

    cancel_study(storage, "newer")
    assert [study_id for study_id, _ in running_studies(storage)] == ["older", "newest"]
    newer = optuna.load_study(study_name=optuna_study_name("newer"), storage=storage)
    assert study_status(newer) == "cancelled"

    assert set_budget(storage, "newer", 5).n_trials == 5
    assert study_status(newer) == "running"
    assert load_spec(newer).n_trials == 5
    assert [study_id for study_id, _ in running_studies(storage)] == ["older", "newer", "newest"]
    with pytest.raises(ValueError, match="n_trials must be >= 1"):
        set_budget(storage, "newer", 0)


def test_racing_claims_never_exceed_the_budget(
    storage_url: str, tiny_study_spec: Callable[..., Any]
) -> None:
    create_study(open_storage(storage_url), tiny_study_spec(), "race")
    upgrade(storage_url)
    name = optuna_study_name("race")
    engine = transaction_engine(storage_url)
    won: list[claims.Claim] = []
    start = threading.Barrier(8)

    def claim_all(worker: int) -> None:
        start.wait()
        while claim := claims.claim_slot(engine, name, n_trials=5, worker_id=f"w{worker}"):
            won.append(claim)

    threads = [threading.Thread(target=claim_all, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claim.slot for claim in won) == [0, 1, 2, 3, 4]
    assert claims.counts(engine, name) == claims.ClaimCounts(running=5)

    # A failed claim frees its slot, a complete one keeps it.
    claims.finish(engine, won[0], claims.FAILED, "boom")
    claims.finish(engine, won[1], claims.COMPLETE)
    again = claims.claim_slot(engine, name, n_trials=5, worker_id="late")
    assert again is not None and again.slot == won[0].slot
    assert claims.claim_slot(engine, name, n_trials=5, worker_id="late") is None
    assert claims.counts(engine, name) == claims.ClaimCounts(running=4, complete=1, failed=1)


def test_the_database_refuses_two_live_claims_on_one_slot(storage_url: str) -> None:
    upgrade(storage_url)
    engine = transaction_engine(storage_url)
    row = {"study_name": "s", "slot": 0, "worker_id": "w", "state": claims.RUNNING}
    with engine.begin() as connection:
        connection.execute(claims.claims.insert().values(**row))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
        connection.execute(claims.claims.insert().values(**{**row, "state": claims.COMPLETE}))
    with engine.begin() as connection:  # failed claims do not hold their slot
        connection.execute(claims.claims.insert().values(**{**row, "state": claims.FAILED}))


def test_a_stale_claim_is_freed_once(storage_url: str) -> None:
    upgrade(storage_url)
    engine = transaction_engine(storage_url)
    alive = claims.claim_slot(engine, "s", n_trials=2, worker_id="alive")
    dead = claims.claim_slot(engine, "s", n_trials=2, worker_id="dead")
    assert alive is not None and dead is not None
    claims.record_trial(engine, dead, trial_id=7, trial_number=3)
    with engine.begin() as connection:  # the dead worker's last heartbeat, a minute ago
        connection.execute(
            claims.claims.update()
            .where(claims.claims.c.claim_id == dead.claim_id)
            .values(heartbeat_at=claims.claims.c.heartbeat_at - sa.text("INTERVAL '60 seconds'"))
            if engine.dialect.name == "postgresql"
            else claims.claims.update()
            .where(claims.claims.c.claim_id == dead.claim_id)
            .values(heartbeat_at=sa.func.datetime(claims.claims.c.heartbeat_at, "-60 seconds"))
        )
    assert claims.heartbeat(engine, alive)
    assert claims.free_stale_claims(engine, "s", grace_period=30) == [
        claims.StaleClaim(dead.claim_id, "dead", 7, 3)
    ]
    assert claims.free_stale_claims(engine, "s", grace_period=30) == []
    assert not claims.heartbeat(engine, dead)
    assert not claims.finish(engine, dead, claims.COMPLETE)  # its result no longer counts
    assert claims.counts(engine, "s") == claims.ClaimCounts(running=1, failed=1)


def test_in_memory_sqlite_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="in-memory SQLite"):
        open_storage("sqlite:///:memory:")
    with pytest.raises(ValueError, match=r"grace_period \(5 s\) must exceed"):
        open_storage(f"sqlite:///{tmp_path / 'x.db'}", heartbeat_interval=10, grace_period=5)


def _open_schema_at(url: str, start: float) -> None:
    from service.migrations import upgrade

    time.sleep(max(0.0, start - time.time()))
    open_storage(url)
    upgrade(url)


def test_processes_starting_together_on_a_fresh_database_all_get_the_schema(
    storage_url: str,
) -> None:
    """An API and its workers start at once on an empty database: every one of them comes up
    (Optuna's CREATE TYPE / CREATE TABLE and the service's migrations run once, under the
    schema lock) instead of one failing with a duplicate-key error."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    start = time.time() + 8.0  # after every interpreter has imported optuna and sqlalchemy
    processes = [
        context.Process(target=_open_schema_at, args=(storage_url, start)) for _ in range(4)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0, 0, 0]
    tables = set(sa.inspect(sa.create_engine(storage_url)).get_table_names())
    assert {"studies", "trials", "liptune_studies", "liptune_alembic_version"} <= tables


def test_a_store_on_an_unmigrated_database_says_how_to_migrate(tmp_path: Path) -> None:
    from worker.study._store import SchemaMissing, StudyStore

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    store = StudyStore(url)
    with pytest.raises(SchemaMissing, match="liptune worker"):
        store.require_schema()
    upgrade(url)  # the same Alembic history as the service's tables creates the claims
    store.require_schema()
    assert sa.inspect(store.engine).has_table(claims.CLAIMS_TABLE)
