"""Workers on a shared study (SQLite and PostgreSQL): an exact budget with racing processes,
a killed worker's trial failed and retried, SIGTERM and cancellation leaving nothing RUNNING.

Worker processes are few on purpose (each one imports torch and MLflow): the racing workers and
the killed one are processes, the workers that survive them run in threads of this process."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
import torch
from optuna.trial import TrialState

from service.migrations import upgrade
from worker.loop import Worker, WorkerOptions, run_worker
from worker.study import _claims as claims
from worker.study._engine import transaction_engine
from worker.study._record import TrialAttributes
from worker.study._studies import cancel_study, create_study, experiment_name, optuna_study_name
from worker.tracking._mlflow import FAILURE_TAG, TRIAL_NUMBER_TAG, TrackingConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Short liveness intervals so that a dead worker is noticed within seconds.
FAST_LIVENESS = ("--heartbeat-interval", "1", "--grace-period", "3")
LONG_TRIAL = {"epochs": 400, "batch_size": 64, "lr": 0.01, "device": "cpu"}


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")


def new_study(storage_url: str, spec: Any) -> tuple[str, optuna.Study]:
    study_id = uuid.uuid4().hex
    upgrade(storage_url)  # the claims table, as `liptune worker` migrates it at start
    create_study(storage_url, spec, study_id)
    return study_id, optuna.load_study(study_name=optuna_study_name(study_id), storage=storage_url)


def trials_in(study: optuna.Study, *states: TrialState) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=states)


def training_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """A running trial that has finished at least one epoch."""
    for trial in trials_in(study, TrialState.RUNNING):
        if trial.user_attrs.get("liptune.epochs"):
            return trial
    return None


def claim_rows(storage_url: str, study_id: str) -> list[Any]:
    table = claims.claims
    with transaction_engine(storage_url).connect() as connection:
        return connection.execute(
            sa.select(table).where(table.c.study_name == optuna_study_name(study_id))
        ).all()


def stop(process: subprocess.Popen, signum: int = signal.SIGTERM, timeout: float = 60) -> int:
    process.send_signal(signum)
    return process.wait(timeout=timeout)


def test_racing_workers_complete_exactly_the_budget(
    storage_url: str, tiny_study_spec: Callable[..., Any], worker_processes: Any
) -> None:
    study_id, study = new_study(storage_url, tiny_study_spec(n_trials=10))
    workers = [worker_processes.start(storage_url, "--once", "--mlflow", "none") for _ in range(3)]
    for index, process in enumerate(workers):
        assert process.wait(timeout=300) == 0, worker_processes.log(f"w{index}")

    complete = trials_in(study, TrialState.COMPLETE)
    assert len(complete) == 10
    assert len(study.trials) == 10  # no extra trial was ever asked
    assert study.user_attrs["liptune.status"] == "completed"
    rows = claim_rows(storage_url, study_id)
    assert sorted(row.slot for row in rows) == list(range(10))
    assert all(row.state == claims.COMPLETE for row in rows)
    assert sorted(row.trial_number for row in rows) == sorted(t.number for t in complete)
    assert {t.user_attrs["liptune.worker"] for t in complete} <= {"w0", "w1", "w2"}
    assert all(
        len(t.values) == 2 and "accuracy" in t.user_attrs["liptune.metrics"] for t in complete
    )


@pytest.mark.postgres
def test_a_worker_on_a_bare_postgresql_url_runs_a_fresh_databases_study(
    postgres_url: str, tiny_study_spec: Callable[..., Any], worker_processes: Any
) -> None:
    """``liptune worker --storage postgresql://...`` (the README's form, no driver named) on a
    database no service has migrated: the worker resolves the URL once, migrates and runs."""
    bare = postgres_url.replace("postgresql+psycopg2://", "postgresql://")
    study_id = uuid.uuid4().hex
    create_study(postgres_url, tiny_study_spec(n_trials=1), study_id)
    process = worker_processes.start(bare, "--once", "--mlflow", "none", name="bare")
    assert process.wait(timeout=300) == 0, worker_processes.log("bare")
    study = optuna.load_study(study_name=optuna_study_name(study_id), storage=postgres_url)
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE
    assert TrialAttributes.read(trial).worker == "bare"
    assert f"{study.study_name} trial 0 complete: accuracy=" in worker_processes.log("bare")
    assert [row.state for row in claim_rows(postgres_url, study_id)] == [claims.COMPLETE]


def in_thread(target: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def complete_with_a_survivor(
    storage_url: str, study: optuna.Study, tracking: TrackingConfig | None = None
) -> None:
    """Run an in-process worker ("survivor", fast liveness) until ``study`` completes."""
    survivor = Worker(
        WorkerOptions(
            storage_url=storage_url,
            tracking=tracking,
            threads=1,
            device="cpu",
            heartbeat_interval=1,
            grace_period=3,
            worker_id="survivor",
            idle_poll_max_s=1.0,
        )
    )
    thread = in_thread(survivor.run)
    try:
        wait_for(
            lambda: study.user_attrs["liptune.status"] == "completed",
            240,
            "the survivor to complete the study",
        )
    finally:
        survivor.stop()
        thread.join(timeout=60)
    assert not thread.is_alive()


def test_a_killed_workers_trial_is_failed_and_retried(
    storage_url: str, tiny_study_spec: Callable[..., Any], worker_processes: Any
) -> None:
    spec = tiny_study_spec(
        n_trials=2, training={**LONG_TRIAL, "epochs": 12}, search_space={"loss": "tau_ce"}
    )
    study_id, study = new_study(storage_url, spec)
    victim = worker_processes.start(storage_url, "--mlflow", "none", *FAST_LIVENESS, name="victim")
    killed = wait_for(lambda: training_trial(study), 120, "the victim to train")
    assert stop(victim, signal.SIGKILL) == -signal.SIGKILL

    complete_with_a_survivor(storage_url, study)

    failed = study.trials[killed.number]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["liptune.failure_reason"] == "worker victim stopped heartbeating"
    retries = [t for t in study.trials if t.user_attrs.get("liptune.retry_of") == killed.number]
    assert len(retries) == 1
    assert retries[0].state == TrialState.COMPLETE
    assert retries[0].user_attrs["liptune.worker"] == "survivor"
    assert retries[0].user_attrs["liptune.params"] == killed.user_attrs["liptune.params"]
    assert len(trials_in(study, TrialState.COMPLETE)) == 2
    assert trials_in(study, TrialState.RUNNING, TrialState.WAITING) == []
    states = sorted(row.state for row in claim_rows(storage_url, study_id))
    assert states == [claims.COMPLETE, claims.COMPLETE, claims.FAILED]


def test_sigterm_fails_and_requeues_the_running_trial(
    storage_url: str, tiny_study_spec: Callable[..., Any]
) -> None:
    """``run_worker``'s SIGTERM handler, on this process: the trial stops at an epoch boundary."""
    study_id, study = new_study(storage_url, tiny_study_spec(n_trials=3, training=LONG_TRIAL))

    def send_sigterm_once_training() -> None:
        wait_for(lambda: training_trial(study), 120, "the worker to train")
        os.kill(os.getpid(), signal.SIGTERM)

    killer = in_thread(send_sigterm_once_training)
    previous_handler = signal.getsignal(signal.SIGTERM)
    options = WorkerOptions(storage_url=storage_url, threads=1, device="cpu")
    assert run_worker(options) == 1  # returns: the signal stopped it
    killer.join()
    assert signal.getsignal(signal.SIGTERM) is previous_handler

    (stopped,) = study.trials[:1]
    assert trials_in(study, TrialState.RUNNING) == []
    assert stopped.state == TrialState.FAIL
    assert stopped.user_attrs["liptune.failure_reason"] == "worker stopped"
    assert 0 < len(stopped.user_attrs["liptune.epochs"]) < LONG_TRIAL["epochs"]
    (requeued,) = trials_in(study, TrialState.WAITING)
    assert requeued.user_attrs["liptune.retry_of"] == stopped.number
    assert requeued.system_attrs["fixed_params"] == stopped.user_attrs["liptune.params"]
    assert [row.state for row in claim_rows(storage_url, study_id)] == [claims.FAILED]


def test_cancellation_is_seen_between_epochs(
    storage_url: str, tiny_study_spec: Callable[..., Any]
) -> None:
    study_id, study = new_study(storage_url, tiny_study_spec(n_trials=3, training=LONG_TRIAL))
    worker = Worker(
        WorkerOptions(storage_url=storage_url, threads=1, device="cpu", exit_when_idle=True)
    )
    torch_threads = torch.get_num_threads()
    thread = in_thread(worker.run)
    try:
        wait_for(lambda: training_trial(study), 120, "the worker to train")
        cancel_study(storage_url, study_id)
    finally:
        thread.join(timeout=120)
        worker.stop()
    assert not thread.is_alive()
    assert torch.get_num_threads() == torch_threads

    assert study.user_attrs["liptune.status"] == "cancelled"
    (trial,) = study.trials
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["liptune.failure_reason"] == "cancelled"
    assert len(trial.user_attrs["liptune.epochs"]) < LONG_TRIAL["epochs"]
    assert [row.state for row in claim_rows(storage_url, study_id)] == [claims.FAILED]


def test_trials_are_tracked_in_the_studys_mlflow_experiment(
    sqlite_url: str, tiny_study_spec: Callable[..., Any], tmp_path: Path
) -> None:
    spec = tiny_study_spec(
        n_trials=1, requirements=[{"metric": "certified_accuracy", "eps": 0.1, "min": 0.99}]
    )
    study_id, study = new_study(sqlite_url, spec)
    tracking = TrackingConfig.for_home(tmp_path)
    options = WorkerOptions(
        storage_url=sqlite_url, tracking=tracking, threads=1, device="cpu", exit_when_idle=True
    )
    assert Worker(options).run() == 1

    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE
    assert trial.constraints == {
        "certified_accuracy_eps_0.1>=0.99": 0.99
        - trial.user_attrs["liptune.metrics"]["certified_accuracy_eps_0.1"]
    }
    assert study.best_trials == []  # the requirement is not met: no feasible trial
    run = tracking.client.get_run(trial.user_attrs["liptune.mlflow_run_id"])
    experiment = tracking.client.get_experiment(run.info.experiment_id)
    assert experiment.name == f"liptune/tiny/{study_id}"
    assert run.data.tags["liptune.study_id"] == study_id
    assert run.data.tags["liptune.trial_number"] == "0"
    assert trial.user_attrs["liptune.model_uri"].startswith("models:/")


def test_a_run_its_killed_worker_left_running_is_ended_by_the_next_logged_trial(
    storage_url: str, tiny_study_spec: Callable[..., Any], worker_processes: Any
) -> None:
    """A real ``liptune worker`` SIGKILLed while it writes its trial's MLflow run (the run is
    created after training, ended after the model, ONNX and radii are logged) leaves the run
    RUNNING; once the orphan check has failed the trial, the next trial a worker logs ends it."""
    spec = tiny_study_spec(n_trials=2)
    study_id, study = new_study(storage_url, spec)
    tracking = TrackingConfig.for_home(worker_processes.home)  # the workers' default store
    victim = worker_processes.start(storage_url, *FAST_LIVENESS, name="victim")

    def running_run() -> Any:
        found = tracking.client.get_experiment_by_name(experiment_name(spec, study_id))
        if found is None:
            return None
        runs = tracking.client.search_runs(
            [found.experiment_id], filter_string="attributes.status = 'RUNNING'"
        )
        return runs[0] if runs else None

    orphan = wait_for(running_run, 240, "the victim to write a run", interval=0.01)
    assert stop(victim, signal.SIGKILL) == -signal.SIGKILL

    complete_with_a_survivor(storage_url, study, tracking)
    complete = trials_in(study, TrialState.COMPLETE)
    assert len(complete) == 2
    run_ids = {t.user_attrs["liptune.mlflow_run_id"] for t in complete}
    assert orphan.info.run_id not in run_ids
    assert {tracking.client.get_run(run_id).info.status for run_id in run_ids} == {"FINISHED"}
    ended = tracking.client.get_run(orphan.info.run_id)
    assert ended.info.status == "FAILED"
    number = ended.data.tags[TRIAL_NUMBER_TAG]
    assert study.trials[int(number)].state == TrialState.FAIL
    assert ended.data.tags[FAILURE_TAG].startswith(
        f"its worker stopped before the run was ended (trial {number} is FAIL:"
    )
    assert running_run() is None


def test_a_study_whose_trials_keep_failing_ends_as_failed(
    sqlite_url: str, tiny_study_spec: Callable[..., Any]
) -> None:
    spec = tiny_study_spec(n_trials=1, dataset={"name": "fashion-mnist", "path": "missing"})
    _, study = new_study(sqlite_url, spec)
    options = WorkerOptions(storage_url=sqlite_url, threads=1, exit_when_idle=True)
    Worker(options).run()

    assert study.user_attrs["liptune.status"] == "failed"
    assert "6 trials failed" in study.user_attrs["liptune.failure_reason"]
    failed = trials_in(study, TrialState.FAIL)
    assert len(failed) == 6 == len(study.trials)
    assert all("missing" in t.user_attrs["liptune.failure_reason"] for t in failed)


def test_a_dead_workers_trial_in_a_cancelled_study_is_failed(
    storage_url: str, tiny_study_spec: Callable[..., Any]
) -> None:
    study_id, study = new_study(storage_url, tiny_study_spec(n_trials=2))
    engine = transaction_engine(storage_url)
    # A worker that claimed a slot and asked Optuna, then died: it never heartbeats.
    claim = claims.claim_slot(engine, study.study_name, n_trials=2, worker_id="dead")
    assert claim is not None
    asked = study.ask()
    claims.record_trial(engine, claim, trial_id=asked._trial_id, trial_number=asked.number)
    cancel_study(storage_url, study_id)

    worker = Worker(WorkerOptions(storage_url=storage_url, heartbeat_interval=1, grace_period=2))
    wait_for(
        lambda: not worker.run_next() and study.trials[0].state == TrialState.FAIL,
        60,
        "the dead worker's trial to be failed",
    )
    assert study.trials[0].user_attrs["liptune.failure_reason"] == (
        "worker dead stopped heartbeating"
    )
    assert len(study.trials) == 1  # a cancelled study's trials are not retried
    assert [row.state for row in claim_rows(storage_url, study_id)] == [claims.FAILED]


def test_completing_a_study_fails_a_trial_no_claim_holds(
    storage_url: str, tiny_study_spec: Callable[..., Any]
) -> None:
    _, study = new_study(storage_url, tiny_study_spec(n_trials=1))
    orphan = study.ask()  # a worker died between asking Optuna and recording it on its claim
    options = WorkerOptions(storage_url=storage_url, threads=1, device="cpu", exit_when_idle=True)
    assert Worker(options).run() == 1

    assert study.user_attrs["liptune.status"] == "completed"
    assert study.trials[orphan.number].state == TrialState.FAIL
    assert study.trials[orphan.number].user_attrs["liptune.failure_reason"] == "no worker holds it"
    assert len(trials_in(study, TrialState.COMPLETE)) == 1


def test_completing_a_study_spares_a_trial_its_worker_is_telling(
    storage_url: str, tiny_study_spec: Callable[..., Any]
) -> None:
    """A worker completes its claim before telling Optuna; another worker that sees every slot
    complete in between must not fail that trial (a race CI hit with three workers)."""
    _, study = new_study(storage_url, tiny_study_spec(n_trials=1))
    engine = transaction_engine(storage_url)
    claim = claims.claim_slot(engine, study.study_name, n_trials=1, worker_id="teller")
    assert claim is not None
    telling = study.ask()
    claims.record_trial(engine, claim, trial_id=telling._trial_id, trial_number=telling.number)
    assert claims.finish(engine, claim, claims.COMPLETE)
    orphan = study.ask()  # and a worker that died between asking and recording its trial

    options = WorkerOptions(storage_url=storage_url, threads=1, device="cpu", exit_when_idle=True)
    assert Worker(options).run() == 0
    assert study.user_attrs["liptune.status"] == "completed"
    assert study.trials[telling.number].state == TrialState.RUNNING
    assert study.trials[orphan.number].state == TrialState.FAIL
    study.tell(telling, [0.5, 0.25])  # the teller goes on
    assert [t.number for t in trials_in(study, TrialState.COMPLETE)] == [telling.number]
