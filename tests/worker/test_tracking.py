"""The MLflow record of a trial: parameters, per-epoch and final metrics, tags, the logged
model, its ONNX file and radii, and the registry round trip."""

from __future__ import annotations

import http.client
import importlib.util

import mlflow
import numpy as np
import onnxruntime
import pytest
import requests
import torch
from mlflow.exceptions import MlflowException

from liptune.certify import certificates, predict_with_certificates
from worker.spec import TrialSpec
from worker.tracking._mlflow import (
    MODEL_URI_TAG,
    TRIAL_NUMBER_TAG,
    TrackingConfig,
    end_orphaned_runs,
    end_run,
    flatten_params,
    mlflow_unreachable,
    onnx_providers,
    register_model,
    start_run,
    using_tracking_uri,
)
from worker.trial._certificates import RadiiSummary
from worker.trial._run import FAILURE_TAG, run_trial
from worker.trial.datasets import load_dataset

torch.set_num_threads(1)
TAGS = {"liptune.study_id": "abc123", "liptune.trial_number": "7"}
EXPERIMENT = "liptune/test-study/abc123"


def spec(**overrides) -> TrialSpec:
    return TrialSpec.model_validate(
        {
            "name": "tracked",
            "dataset": {"name": "digits"},
            "model": {"name": "mlp", "widths": [32, 32]},
            "training": {"epochs": 3, "batch_size": 64, "lr": 3e-3},
            "loss": {"family": "hkr", "margin": 0.4},
            "eps": [0.1, 0.5],
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    config = TrackingConfig.for_home(home)
    result = run_trial(spec(), tracking=config, experiment=EXPERIMENT, tags=TAGS, data_roots=[])
    assert result.status == "completed"
    return config, result


def test_embedded_default_lives_under_the_data_directory(tracked, tmp_path_factory):
    config, result = tracked
    assert config.tracking_uri.startswith("sqlite:///") and config.tracking_uri.endswith(
        "/mlflow.db"
    )
    experiment = config.client.get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location.startswith(config.artifact_root.as_uri())
    run = config.client.get_run(result.run_id)
    assert run.info.experiment_id == experiment.experiment_id
    assert run.info.status == "FINISHED"


def test_run_holds_every_parameter_and_the_tags(tracked):
    config, result = tracked
    run = config.client.get_run(result.run_id)
    params = run.data.params
    expected = flatten_params(spec().model_dump(mode="json"))
    assert {key: params[key] for key in expected} == expected
    assert params["loss.family"] == "hkr" and params["loss.margin"] == "0.4"
    assert params["loss.alpha_kr"] == "50.0"  # the default the loss actually used
    assert params["model.widths"] == "[32, 32]" and params["training.epochs"] == "3"
    tags = run.data.tags
    assert tags["liptune.study_id"] == "abc123" and tags["liptune.trial_number"] == "7"
    assert tags["liptune.loss_family"] == "hkr"
    assert tags["liptune.certificate_mode"] == "global"
    assert tags[MODEL_URI_TAG] == result.model_uri and result.model_uri.startswith("models:/m-")


def test_run_holds_epoch_metrics_with_steps_and_final_metrics(tracked):
    config, result = tracked
    client = config.client
    history = client.get_metric_history(result.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]
    by_step = {m.step: m.value for m in history}
    assert by_step == {r["epoch"]: pytest.approx(r["val_accuracy"]) for r in result.epochs}
    losses = client.get_metric_history(result.run_id, "train_loss")
    assert len(losses) == 3
    assert len(client.get_metric_history(result.run_id, "val_certified_accuracy_eps_0.5")) == 3
    final = client.get_run(result.run_id).data.metrics
    for key, value in result.metrics.items():
        assert final[key] == pytest.approx(value), key


def test_logged_model_onnx_and_radii_give_the_trial_s_outputs(tracked, tmp_path, mlflow_store):
    config, result = tracked
    splits = load_dataset(spec().dataset, data_roots=[], seed=0)
    x = splits.test.x[:50]
    with torch.no_grad():
        expected = result.model(x).numpy()
    client = config.client
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"model.onnx", "certificates"} <= artifacts
    onnx_path = client.download_artifacts(result.run_id, "model.onnx", str(tmp_path))
    session = onnxruntime.InferenceSession(onnx_path)
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-5)
    radii_path = client.download_artifacts(result.run_id, "certificates/radii.npz", str(tmp_path))
    with np.load(radii_path) as saved:
        assert saved["radii"].shape == (len(splits.test),)
        assert saved["labels"].tolist() == splits.test.y.tolist()
        summary = RadiiSummary.from_arrays(saved["radii"], saved["correct"])
        assert saved["correct"].mean() == pytest.approx(result.metrics["accuracy"])
    np.testing.assert_allclose(summary.radii, result.radii.radii, atol=2e-5)
    with mlflow_store(config.tracking_uri):
        loaded = mlflow.pytorch.load_model(result.model_uri)
    assert loaded.certificate_mode == "global"
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), expected, atol=1e-6)


def test_registered_model_loads_back_by_alias(tracked, mlflow_store):
    config, result = tracked
    uri = register_model(config.tracking_uri, result.run_id, "digits-mlp", ["best", "staging"])
    assert uri == "models:/digits-mlp@best"
    again = register_model(config.tracking_uri, result.model_uri, "digits-mlp")
    assert again == "models:/digits-mlp/2"
    assert str(config.client.get_model_version_by_alias("digits-mlp", "staging").version) == "1"
    with mlflow_store(config.tracking_uri):
        loaded = mlflow.pytorch.load_model("models:/digits-mlp@best")
    x = load_dataset(spec().dataset, data_roots=[], seed=0).test.x[:20]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x), atol=1e-6, rtol=0)


def test_failed_trial_is_recorded_as_failed_without_metrics(tracked):
    config, _ = tracked
    diverging = spec(loss={"family": "tau_ce", "temperature": 3e38})
    result = run_trial(diverging, tracking=config, experiment=EXPERIMENT, data_roots=[])
    assert result.status == "failed" and result.run_id
    run = config.client.get_run(result.run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics == {}
    assert "training loss became" in run.data.tags[FAILURE_TAG]
    assert run.data.params["loss.temperature"] == str(3e38)
    with pytest.raises(ValueError, match="logged no model"):
        register_model(config.tracking_uri, result.run_id, "never", ["best"])


def test_models_live_in_the_trials_run_and_the_studys_experiment(tracked):
    """MLflow's own search sees both models in the study's experiment, from the trial's run,
    with their files under the configured artifact root (not ./mlruns, not Default)."""
    config, result = tracked
    experiment = config.client.get_experiment_by_name(EXPERIMENT)
    with using_tracking_uri(config.tracking_uri):
        models = mlflow.search_logged_models(
            experiment_ids=[experiment.experiment_id], output_format="list"
        )
        default = mlflow.search_logged_models(experiment_ids=["0"], output_format="list")
    assert sorted(model.name for model in models) == ["model", "onnx"]
    assert default == []
    for model in models:
        assert model.source_run_id == result.run_id
        assert model.artifact_location.startswith(config.artifact_root.as_uri())
    assert result.model_uri == f"models:/{next(m for m in models if m.name == 'model').model_id}"


def test_onnx_model_is_a_real_mlflow_model_with_a_signature(tracked, mlflow_store):
    config, result = tracked
    experiment = config.client.get_experiment_by_name(EXPERIMENT)
    (onnx_model,) = [
        model
        for model in config.client.search_logged_models([experiment.experiment_id])
        if model.name == "onnx"
    ]
    x = load_dataset(spec().dataset, data_roots=[], seed=0).test.x[:16]
    with mlflow_store(config.tracking_uri):
        info = mlflow.models.get_model_info(f"models:/{onnx_model.model_id}")
        pyfunc = mlflow.pyfunc.load_model(f"models:/{onnx_model.model_id}")
    assert info.flavors.keys() >= {"onnx", "python_function"}
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"][1:]) == [1, 8, 8]
    with torch.no_grad():
        expected = result.model(x)
    predicted = pyfunc.predict(x.numpy())  # {output name: array}
    assert sorted(predicted) == ["output", "radius"]
    np.testing.assert_allclose(predicted["output"], expected.numpy(), atol=1e-5)
    # The graph's radius is the PyTorch certificate with the trial's guaranteed bound.
    bound = result.metrics["lipschitz_bound"]
    radii = certificates(expected, "global", lipschitz=bound).numpy()
    assert predicted["radius"].shape == (16,)
    np.testing.assert_allclose(predicted["radius"], radii, rtol=1e-5, atol=1e-6)
    # Logged with the providers this machine has: no warning about a missing CUDA.
    assert info.flavors["onnx"]["providers"] == onnx_providers()
    assert set(onnx_providers()) <= set(onnxruntime.get_available_providers())


SERVE_WITHOUT_LIPTUNE = """
import importlib.util, json, os, sys
# The project's checkout and its editable install out of reach: only the model's own copy of
# the core (its code_paths) can provide liptune.
sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != {repo!r}]
def editable(hook):
    return "__editable__" in (getattr(hook, "__module__", None) or type(hook).__module__)
sys.meta_path[:] = [finder for finder in sys.meta_path if not editable(finder)]
sys.path_hooks[:] = [hook for hook in sys.path_hooks if not editable(hook)]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("liptune") is None, "liptune is importable"
import mlflow, numpy as np
mlflow.set_tracking_uri({uri!r})
model = mlflow.pyfunc.load_model({model_uri!r})
x = np.load({x_path!r})
answer = model.predict(x, params={{"eps": 0.1}})
print(json.dumps(answer.to_dict(orient="list")))
"""


def test_registered_model_serves_where_liptune_is_not_importable(tracked, tmp_path):
    """A fresh process without liptune loads the registered model as pyfunc (what
    `mlflow models serve --env-manager local` does) and answers the trial's logits, labels and
    certified radii (margin / (sqrt(2) L), the trial's bound L)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    config, result = tracked
    uri = register_model(config.tracking_uri, result.model_uri, "served-mlp", ["prod"])
    x = load_dataset(spec().dataset, data_roots=[], seed=0).test.x[:8].numpy()
    x_path = tmp_path / "x.npy"
    np.save(x_path, x)
    repo = str(Path(__file__).resolve().parents[2])
    script = SERVE_WITHOUT_LIPTUNE.format(
        repo=repo, uri=config.tracking_uri, model_uri=uri, x_path=str(x_path)
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.splitlines()[-1])
    logits, labels, radii = predict_with_certificates(
        result.model, torch.from_numpy(x), lipschitz=result.metrics["lipschitz_bound"]
    )
    np.testing.assert_allclose(np.array(answer["logits"]), logits.numpy(), atol=1e-6)
    assert answer["label"] == labels.tolist()
    np.testing.assert_allclose(answer["radius"], radii.numpy(), atol=1e-6)
    assert answer["certified"] == (radii >= 0.1).tolist()


def test_only_running_runs_of_finished_trials_are_ended_as_orphans(tmp_path):
    config = TrackingConfig.for_home(tmp_path)
    assert end_orphaned_runs(config, "liptune/none/0", {0: "FAIL"}) == []  # no experiment yet

    def run(number: str) -> str:
        return start_run(
            config,
            experiment=EXPERIMENT,
            run_name=number,
            params={},
            tags={TRIAL_NUMBER_TAG: number},
        )

    failed, writing, unknown, pruned = run("0"), run("1"), run("9"), run("3")
    done = run("2")
    end_run(config, done, "FINISHED")
    states = {0: "FAIL", 1: "RUNNING", 2: "COMPLETE", 3: "PRUNED"}
    assert sorted(end_orphaned_runs(config, EXPERIMENT, states)) == sorted([failed, pruned])
    status = {
        run_id: config.client.get_run(run_id).info.status
        for run_id in (failed, writing, unknown, pruned, done)
    }
    assert status == {
        failed: "FAILED",
        writing: "RUNNING",  # its trial is live: its worker is still writing it
        unknown: "RUNNING",  # not a trial this study knows
        pruned: "FAILED",
        done: "FINISHED",
    }
    assert "trial 3 is PRUNED" in config.client.get_run(pruned).data.tags[FAILURE_TAG]
    assert end_orphaned_runs(config, EXPERIMENT, states) == []  # nothing left to end


@pytest.mark.parametrize(
    ("error", "unreachable"),
    [
        # a server killed while it answered (seen in CI): the response is cut off
        (
            MlflowException(
                "API request to http://127.0.0.1:1/api/2.0/mlflow/logged-models/m-1 failed with "
                "exception ('Connection broken: IncompleteRead(0 bytes read, 478 more expected)', "
                "IncompleteRead(0 bytes read, 478 more expected))"
            ),
            True,
        ),
        (requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead"), True),
        (http.client.IncompleteRead(b"", 478), True),
        (requests.ConnectionError("Connection refused"), True),
        (MlflowException("RESOURCE_DOES_NOT_EXIST: Run 'x' not found"), False),
        (ValueError("bad metric"), False),
    ],
    ids=["mlflow-cut-off", "chunked", "incomplete-read", "refused", "not-found", "other"],
)
def test_a_cut_off_response_counts_as_mlflow_unreachable(error, unreachable):
    assert mlflow_unreachable(error) is unreachable
    wrapped = RuntimeError("while logging")
    wrapped.__cause__ = error
    assert mlflow_unreachable(wrapped) is unreachable


@pytest.mark.parametrize(
    "uri",
    [
        "http://tracker:5000",
        "https://user:secret@tracker",
        "databricks",
        "file:///srv/mlruns",
        "sqlite:////srv/mlflow.db",
        "postgresql+psycopg2://mlflow@db/mlflow",
    ],
)
def test_a_tracking_uri_is_kept_as_given_unless_it_is_a_bare_postgresql_url(uri):
    assert TrackingConfig(uri).tracking_uri == uri


def test_a_bare_postgresql_tracking_uri_gets_an_installed_driver():
    uri = TrackingConfig("postgresql://mlflow:secret@db:5432/mlflow").tracking_uri
    driver = "postgresql" if importlib.util.find_spec("psycopg") else "postgresql+psycopg2"
    assert uri == f"{driver}://mlflow:secret@db:5432/mlflow"
