"""Conditional studies (``strategy: conditional``, issue 22) over REST, with real workers, MLflow
and the registry: ONE conditioned network per study, every trial an evaluation of it.

- a tau-CE study run by two in-process workers in turn completes its trials with one training
  (one MLflow run tagged ``liptune.conditional_training``, one evaluation run per trial that
  names it), ``epochs_spent`` is the network's epochs, every trial's guaranteed bound is at most
  1 + tolerance and its attack check finds no violation, fronts and recommendations answer, and a
  registered trial's model serves through the pyfunc loader like any other;
- the evaluated model of a trial is the conditioned network's forward pass at the trial's
  parameters (the logged model against the network loaded back from its MLflow run);
- an HKR network conditioned on (margin, alpha_kr) trains and evaluates on the worker path;
- the training lease: one worker at a time, freed when its worker stops heartbeating;
- every refusal of the strategy is a 422 naming the field, and a ``train`` study's stored spec
  does not mention the strategy.
"""

from __future__ import annotations

import copy
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
import pytest
import torch
from fastapi.testclient import TestClient
from optuna.trial import TrialState

from liptune.export import vanilla_export_at
from service.app import create_app
from service.config import Settings
from service.migrations import upgrade
from worker.loop import Worker, WorkerOptions
from worker.spec import StudySpec
from worker.study._store import StudyStore
from worker.study._studies import create_study, experiment_name, optuna_study_name
from worker.tracking._mlflow import TrackingConfig
from worker.trial._conditional import NETWORK_RUN_TAG, TRAINING_TAG, ConditionSpace, load_network
from worker.trial._run import LIPSCHITZ_TOLERANCE, run_conditioned_trial, train_conditioned
from worker.trial.datasets import load_dataset

SPEC: dict[str, Any] = {
    "name": "conditional",
    "dataset": {"name": "digits"},
    "model": {"name": "mlp", "widths": [32, 32]},
    "training": {"epochs": 2, "batch_size": 64, "lr": 0.01, "device": "cpu"},
    "search_space": {"loss": "tau_ce", "temperature": {"low": 0.1, "high": 50.0, "log": True}},
    "objectives": [{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.1}],
    "eps": [0.1, 0.3],
    "n_trials": 3,
    "sampler": "random",
    "seed": 0,
    "strategy": "conditional",
}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def client(home: Path) -> TestClient:
    settings = Settings(home=home, workers=0, cache_ttl_s=0.0)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def worker(client: TestClient, home: Path, name: str) -> Worker:
    settings = client.app.state.resources.settings
    return Worker(
        WorkerOptions(
            storage_url=settings.resolved_storage_url(),
            tracking=TrackingConfig.for_home(home),
            threads=1,
            device="cpu",
            worker_id=name,
            idle_poll_max_s=0.2,
        )
    )


@pytest.fixture(scope="module")
def done(client: TestClient, home: Path) -> dict[str, Any]:
    """The tau-CE study, run by two workers taking turns (the second loads the network)."""
    torch.set_num_threads(1)
    response = client.post("/studies", json=SPEC)
    assert response.status_code == 201, response.text
    study_id = response.json()["id"]
    first, second = worker(client, home, "w1"), worker(client, home, "w2")
    assert first.run_next()  # trains the network, then evaluates trial 0
    assert second.run_next()  # loads it from MLflow, evaluates trial 1
    assert first.run_next()  # trial 2, from memory
    assert not first.run_next() and not second.run_next()
    config = TrackingConfig.for_home(home)
    experiment = mlflow.MlflowClient(config.tracking_uri).get_experiment_by_name(
        experiment_name(StudySpec.model_validate(SPEC), study_id)
    )
    runs = config.client.search_runs([experiment.experiment_id], max_results=100)
    return {
        "id": study_id,
        "study": client.get(f"/studies/{study_id}").json(),
        "trials": client.get(f"/studies/{study_id}/trials").json()["items"],
        "runs": runs,
        "config": config,
    }


def test_a_conditional_study_completes_its_trials_with_one_training(done):
    study, trials, runs = done["study"], done["trials"], done["runs"]
    assert study["status"] == "completed", study
    assert study["spec"]["strategy"] == "conditional"
    training = [run for run in runs if run.data.tags.get(TRAINING_TAG) == "true"]
    evaluations = [run for run in runs if run.data.tags.get(TRAINING_TAG) != "true"]
    assert len(training) == 1 and len(evaluations) == SPEC["n_trials"]
    (network_run,) = training
    assert network_run.info.status == "FINISHED"
    assert network_run.data.metrics["epochs"] == SPEC["training"]["epochs"]
    assert {run.data.tags[NETWORK_RUN_TAG] for run in evaluations} == {network_run.info.run_id}
    assert all(run.info.status == "FINISHED" for run in evaluations)
    assert study["epochs_spent"] == SPEC["training"]["epochs"]
    assert study["epochs"]["spent"] == 0  # the trials trained nothing
    network = study["conditioned_network"]
    assert network["status"] == "trained" and network["epochs"] == SPEC["training"]["epochs"]
    assert network["mlflow_run_id"] == network_run.info.run_id and network["worker"] == "w1"
    assert len(trials) == SPEC["n_trials"]
    temperatures = set()
    for trial in trials:
        assert trial["state"] == "COMPLETE", trial
        assert trial["epochs_trained"] == 0
        assert trial["metrics"]["lipschitz_bound"] <= 1.0 + LIPSCHITZ_TOLERANCE
        assert trial["attack"]["points"] > 0 and trial["attack"]["violations"] == 0
        assert 0.1 <= trial["params"]["temperature"] <= 50.0
        temperatures.add(trial["params"]["temperature"])
    assert len(temperatures) == SPEC["n_trials"]


def test_fronts_and_recommendations_answer_for_a_conditional_study(client, done):
    study_id = done["id"]
    front = client.get(f"/studies/{study_id}/pareto").json()["trials"]
    assert front and all(item["state"] == "COMPLETE" for item in front)
    at_eps = client.get(f"/studies/{study_id}/pareto", params={"eps": 0.3}).json()["trials"]
    assert at_eps
    knee = client.get(f"/studies/{study_id}/recommend", params={"strategy": "knee"})
    assert knee.status_code == 200, knee.text
    page = client.get(f"/studies/{study_id}", headers={"Accept": "text/html"})
    assert page.status_code == 200
    number = done["trials"][0]["number"]
    trial_page = client.get(f"/studies/{study_id}/trials/{number}", headers={"Accept": "text/html"})
    assert trial_page.status_code == 200, trial_page.text


def test_a_registered_conditional_trial_serves_like_any_other(client, done, mlflow_store):
    study_id, config = done["id"], done["config"]
    number = done["trials"][0]["number"]
    response = client.post(
        f"/studies/{study_id}/trials/{number}/register",
        json={"name": "conditional-digits", "aliases": ["chosen"]},
    )
    assert response.status_code == 201, response.text
    spec = StudySpec.model_validate(SPEC)
    x = load_dataset(spec.dataset, data_roots=[], seed=spec.seed).test.x[:16]
    with mlflow_store(config.tracking_uri):
        pyfunc = mlflow.pyfunc.load_model("models:/conditional-digits@chosen")
    answer = pyfunc.predict(x.numpy(), params={"eps": 0.1})
    assert list(answer.columns) == ["label", "radius", "logits", "certified"]
    network = load_network(config, done["study"]["conditioned_network"]["mlflow_run_id"], spec)
    params = done["trials"][0]["params"]
    exported = vanilla_export_at(network, ConditionSpace.of(spec).condition(params))
    with torch.no_grad():
        logits = exported(x)
    assert answer["label"].tolist() == logits.argmax(dim=1).tolist()
    top2 = logits.topk(2, dim=1).values
    bound = done["trials"][0]["metrics"]["lipschitz_bound"]
    radii = (top2[:, 0] - top2[:, 1]) / (np.sqrt(2) * bound)
    np.testing.assert_allclose(answer["radius"], radii.numpy(), atol=1e-5)


def test_each_trial_evaluates_the_conditioned_forward_at_its_parameters(done, mlflow_store):
    """Export equality on the worker's path: the model a trial logged is the network loaded
    back from the training run, run at the condition of that trial's parameters."""
    config = done["config"]
    spec = StudySpec.model_validate(SPEC)
    network = load_network(config, done["study"]["conditioned_network"]["mlflow_run_id"], spec)
    space = ConditionSpace.of(spec)
    x = torch.rand(32, 1, 8, 8)
    for trial in done["trials"]:
        with mlflow_store(config.tracking_uri):
            logged = mlflow.pytorch.load_model(trial["model_uri"], map_location="cpu")
        condition = space.condition(trial["params"])
        with torch.no_grad():
            torch.testing.assert_close(logged(x), network(x, condition), atol=1e-5, rtol=1e-5)


def test_an_hkr_network_conditioned_on_margin_and_alpha_trains_and_evaluates(one_torch_thread):
    spec = StudySpec.model_validate(
        {
            **SPEC,
            "model": {"name": "convnet", "channels": [4], "dense_widths": [16]},
            "training": {**SPEC["training"], "epochs": 1},
            "search_space": {
                "loss": "hkr",
                "margin": {"low": 0.05, "high": 1.0, "log": True},
                "alpha_kr": {"low": 1.0, "high": 500.0, "log": True},
            },
        }
    )
    network, run, _ = train_conditioned(spec, device="cpu")
    assert run.failure_reason is None and len(run.epochs) == 1
    space = ConditionSpace.of(spec)
    assert list(space.ranges) == ["margin", "alpha_kr"] and network.condition_features == 2
    for params in ({"margin": 0.05, "alpha_kr": 1.0}, {"margin": 0.7, "alpha_kr": 300.0}):
        params = {"loss": "hkr", **params}
        result = run_conditioned_trial(
            spec.trial_spec(params, seed=spec.seed),
            network,
            space.condition(params),
            network_run_id=None,
            tracking=None,
        )
        assert result.status == "completed", result.failure_reason
        assert result.metrics["lipschitz_bound"] <= 1.0 + LIPSCHITZ_TOLERANCE
        assert result.attack.violations == 0 and result.metrics["training_time"] == 0.0
    with pytest.raises(ValueError, match="outside the range"):
        space.condition({"loss": "hkr", "margin": 2.0, "alpha_kr": 10.0})


def test_the_training_lease_is_held_by_one_worker_and_freed_when_it_dies(storage_url):
    upgrade(storage_url)
    store = StudyStore(storage_url)
    lease = store.claim_training("liptune-x", worker_id="a")
    assert lease is not None and lease.slot == -1
    assert store.claim_training("liptune-x", worker_id="b") is None
    assert store.claim_counts("liptune-x").running == 0  # the lease is no trial
    assert store.training_counts("liptune-x").running == 1
    trial_claim = store.claim("liptune-x", n_trials=1, worker_id="b")
    assert trial_claim.slot == 0
    time.sleep(1.1)
    assert store.heartbeat(trial_claim, None)  # b lives on, a stopped heartbeating
    (stale,) = store.free_stale_claims("liptune-x", grace_period=1)
    assert stale.claim_id == lease.claim_id and stale.trial_id is None
    again = store.claim_training("liptune-x", worker_id="b")
    assert again is not None
    assert store.finish_claim(again, store_state("complete"))
    assert store.claim_training("liptune-x", worker_id="c") is None  # trained: no second one
    assert store.training_counts("liptune-x").failed == 1


def process_study(storage_url: str, home: Path, **changes: Any) -> tuple[str, StudySpec]:
    spec = StudySpec.model_validate({**SPEC, **changes})
    study_id = uuid.uuid4().hex
    create_study(storage_url, spec, study_id)
    return study_id, spec


def training_runs(home: Path, spec: StudySpec, study_id: str) -> list[Any]:
    config = TrackingConfig.for_home(home)
    experiment = config.client.get_experiment_by_name(experiment_name(spec, study_id))
    runs = config.client.search_runs([experiment.experiment_id], max_results=100)
    return [run for run in runs if run.data.tags.get(TRAINING_TAG) == "true"]


def test_a_killed_trainer_does_not_block_the_study_and_two_workers_train_once(
    sqlite_url, worker_processes
):
    """The lease of a trainer that stopped heartbeating is freed like a trial's claim: of the
    two worker processes started after it, one trains the network again (once) and the study
    completes; the lost epochs count as spent."""
    epochs = 40
    study_id, spec = process_study(
        sqlite_url, worker_processes.home, training={**SPEC["training"], "epochs": epochs}
    )
    beats = ("--heartbeat-interval", "1", "--grace-period", "3")
    doomed = worker_processes.start(sqlite_url, *beats, name="doomed")
    store = StudyStore(sqlite_url)
    name = optuna_study_name(study_id)
    deadline = time.monotonic() + 120
    while store.conditioned_network(name).get("epochs", 0) < 2:
        assert time.monotonic() < deadline and doomed.poll() is None, worker_processes.log("doomed")
        time.sleep(0.2)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    lost = store.conditioned_network(name)["epochs_spent"]
    assert 2 <= lost < epochs
    time.sleep(3.5)  # past the grace period: the lease is stale
    survivors = [worker_processes.start(sqlite_url, "--once", *beats) for _ in range(2)]
    for process in survivors:
        assert process.wait(timeout=600) == 0, worker_processes.log("w1")
    logs = worker_processes.log("w1") + worker_processes.log("w2")
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    assert study.user_attrs["liptune.status"] == "completed", logs
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == spec.n_trials
    assert logs.count("training its conditioned network") == 1, logs
    record = store.conditioned_network(name)
    assert record["status"] == "trained" and record["worker"] in ("w1", "w2")
    assert record["epochs"] == epochs and record["epochs_spent"] >= epochs + lost
    (run,) = training_runs(worker_processes.home, spec, study_id)  # the dead one logged none
    assert run.info.run_id == record["mlflow_run_id"] and run.info.status == "FINISHED"
    assert store.training_counts(name).failed == 1


def store_state(name: str):
    from worker.study._claims import ClaimState

    return ClaimState(name)


def changed(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = spec
        for part in parents:
            node = node[part]
        node[leaf] = value
    return spec


REFUSED = [
    ({"search_space.loss": ["tau_ce", "hkr"]}, "body.search_space.loss", "ONE loss family"),
    (
        {"search_space": {"loss": "hinge", "margin": {"low": 0.1, "high": 1.0}}},
        "body.search_space.loss",
        "tau_ce, hkr, offset_ce",
    ),
    ({"search_space.temperature": [1.0, 10.0]}, "body.search_space.temperature", "as a range"),
    ({"search_space.temperature": 10.0}, "body.search_space.temperature", "at least one"),
    ({"model": {"name": "resnet"}}, "body.model.name", "mlp and convnet"),
    (
        {"pruner": {"name": "mo-asha", "min_epochs": 1}},
        "body.pruner.name",
        "use the pruner `none`",
    ),
    (
        {"model": {"name": "convnet"}, "search_space.conv": ["aol"]},
        "body.search_space.conv",
        "drop search_space.conv",
    ),
    (
        {"objectives": [{"metric": "accuracy"}, {"metric": "training_time"}]},
        "body.objectives.1.metric",
        "training_time cannot be searched",
    ),
    (
        {"baselines": [{"loss": "tau_ce", "temperature": 100.0}]},
        "body.baselines.0",
        "must lie in [0.1, 50]",
    ),
    ({"strategy": "distill"}, "body.strategy", "unknown value"),
]


@pytest.mark.parametrize(("changes", "field", "reason"), REFUSED)
def test_a_conditional_study_it_cannot_run_is_a_422_naming_the_field(
    client, changes, field, reason
):
    before = client.get("/studies").json()["total"]
    response = client.post("/studies", json=changed(**changes))
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert any(e["field"] == field and reason in e["reason"] for e in errors), errors
    assert client.get("/studies").json()["total"] == before


def test_a_train_study_spec_does_not_mention_the_strategy():
    train = {key: value for key, value in SPEC.items() if key != "strategy"}
    spec = StudySpec.model_validate(train)
    assert spec.strategy == "train" and not spec.conditional
    assert "strategy" not in spec.model_dump_json() and "strategy" not in spec.model_dump()
    assert StudySpec.model_validate(SPEC).model_dump()["strategy"] == "conditional"
    assert (
        spec.evaluation_seed(3)
        == spec.trial_seed(3)
        != StudySpec.model_validate(SPEC).evaluation_seed(3)
    )
