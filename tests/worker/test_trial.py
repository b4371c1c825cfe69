"""One trial end to end without MLflow: accuracy, certificates, seeds, NaN guard, cancellation,
the Lipschitz-bound check, and ``liptune train`` on a spec file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from worker.spec import TrialSpec, metric_key
from worker.trial._certificates import RadiiSummary
from worker.trial._run import LIPSCHITZ_TOLERANCE, TrialResult, _finish, run_trial
from worker.trial._training import TrainingRun
from worker.trial.datasets import load_dataset

torch.set_num_threads(1)
EPS = [0.1, 0.25, 0.5]
LIPTUNE = Path(sys.executable).parent / "liptune"


def digits_spec(**overrides) -> TrialSpec:
    spec = {
        "name": "digits-test",
        "dataset": {"name": "digits"},
        "model": {"name": "mlp", "widths": [64, 64]},
        "training": {"epochs": 6, "batch_size": 64, "lr": 3e-3},
        "loss": {"family": "hkr", "alpha_kr": 50, "margin": 0.5},
        "eps": EPS,
        **overrides,
    }
    return TrialSpec.model_validate(spec)


@pytest.fixture(scope="module")
def completed() -> tuple[TrialSpec, TrialResult, list[dict]]:
    spec = digits_spec(pgd={"eps": [0.25], "steps": 5, "n_samples": 64})
    seen: list[dict] = []
    return spec, run_trial(spec, tracking=None, data_roots=[], on_epoch=seen.append), seen


def test_digits_trial_reaches_sensible_accuracy_and_certificates(completed):
    result = completed[1]
    assert result.status == "completed" and result.failure_reason is None
    assert result.certificate_mode == "global"
    metrics = result.metrics
    assert metrics["accuracy"] > 0.8
    assert metrics[metric_key("certified_accuracy", 0.1)] > 0.3
    certified = [metrics[metric_key("certified_accuracy", eps)] for eps in EPS]
    assert certified == sorted(certified, reverse=True) and certified[0] <= metrics["accuracy"]
    # PGD can only find errors among uncertified points: certified <= empirical <= clean.
    empirical = metrics[metric_key("empirical_robust_accuracy", 0.25)]
    assert certified[1] - 0.15 <= empirical <= metrics["accuracy"] + 0.15  # PGD: 64-point sample
    assert metrics["lipschitz_bound"] <= 1.0 + LIPSCHITZ_TOLERANCE
    assert 0 < metrics["provable_avg_robustness"] <= metrics["mean_certified_radius"]
    assert metrics["training_time"] == pytest.approx(sum(e["seconds"] for e in result.epochs))


def test_radii_summary_matches_the_reported_certified_accuracy(completed):
    spec, result, _ = completed
    assert isinstance(result.radii, RadiiSummary)
    test_size = len(load_dataset(spec.dataset, data_roots=[], seed=spec.seed).test)
    assert result.radii.n == test_size
    recomputed = result.radii.certified_accuracy(EPS)
    for eps, value in zip(EPS, recomputed, strict=True):
        assert value == pytest.approx(
            result.metrics[metric_key("certified_accuracy", eps)], abs=2e-3
        )


def test_epoch_records_and_callback(completed):
    _, result, seen = completed
    assert [record["epoch"] for record in result.epochs] == list(range(1, 7))
    assert seen == result.epochs
    for record in result.epochs:
        assert {"train_loss", "val_accuracy", "seconds"} <= set(record)
        assert all(f"val_certified_accuracy_eps_{eps:g}" in record for eps in EPS)
    assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"]


def test_exported_model_is_plain_and_gives_the_certificates(completed):
    spec, result, _ = completed
    model = result.model
    assert model.certificate_mode == "global"
    assert not any("parametrizations" in name for name, _ in model.named_modules())
    splits = load_dataset(spec.dataset, data_roots=[], seed=spec.seed)
    with torch.no_grad():
        logits = model(splits.test.x)
    accuracy = (logits.argmax(1) == splits.test.y).double().mean().item()
    assert accuracy == pytest.approx(result.metrics["accuracy"])


def test_same_seed_same_metrics_other_seed_other_metrics():
    spec = digits_spec(training={"epochs": 2, "batch_size": 64, "schedule": "cosine"})
    first = run_trial(spec, tracking=None, data_roots=[])
    again = run_trial(spec, tracking=None, data_roots=[])
    other = run_trial(spec.model_copy(update={"seed": 1}), tracking=None, data_roots=[])
    without_time = [
        {k: v for k, v in r.metrics.items() if k != "training_time"} for r in (first, again, other)
    ]
    assert without_time[0] == without_time[1]
    assert without_time[0] != without_time[2]


def test_exploding_loss_fails_the_trial_without_metrics():
    spec = digits_spec(loss={"family": "tau_ce", "temperature": 3e38})
    result = run_trial(spec, tracking=None, data_roots=[])
    assert result.status == "failed"
    assert "training loss became" in result.failure_reason and "epoch 1" in result.failure_reason
    assert result.metrics == {} and result.model is None and result.radii is None


def test_should_stop_cancels_between_epochs():
    spec = digits_spec()
    epochs_seen: list[dict] = []
    result = run_trial(
        spec,
        tracking=None,
        data_roots=[],
        on_epoch=epochs_seen.append,
        should_stop=lambda: len(epochs_seen) >= 2,
    )
    assert result.status == "cancelled"
    assert len(result.epochs) == 2 and result.metrics == {}


def _scaled_linear_model(scale: float):
    from liptune.nn import LipschitzSequential

    linear = torch.nn.Linear(64, 10)
    with torch.no_grad():
        linear.weight.copy_(torch.linalg.qr(torch.randn(64, 10)).Q.T * scale)
    return LipschitzSequential(torch.nn.Flatten(), linear, certificate_mode="global")


def test_a_model_whose_bound_is_clearly_above_one_is_never_a_result():
    spec = digits_spec()
    splits = load_dataset(spec.dataset, data_roots=[], seed=0)
    result = TrialResult(status="completed", certificate_mode="global")
    _finish(result, _scaled_linear_model(1.05), splits, spec, TrainingRun(), torch.device("cpu"))
    assert result.status == "failed"
    assert "1.050000 > 1 + 0.01" in result.failure_reason
    assert result.metrics == {} and result.model is None


def test_a_bound_a_hair_above_one_shrinks_the_certificates():
    from liptune import certify

    spec = digits_spec()
    splits = load_dataset(spec.dataset, data_roots=[], seed=0)
    result = TrialResult(status="completed", certificate_mode="global")
    test = _finish(
        result, _scaled_linear_model(1.005), splits, spec, TrainingRun(), torch.device("cpu")
    )
    assert result.status == "completed"
    bound = result.metrics["lipschitz_bound"]
    assert bound == pytest.approx(1.005, rel=1e-6)
    assert result.metrics["lipschitz_estimate"] <= bound
    trusting = certify.certificates(test.logits, "global")
    assert torch.allclose(test.radii, trusting / bound)


def test_configuration_errors_raise_before_training():
    binary = digits_spec(dataset={"name": "digits", "classes": [0, 8]})
    with pytest.raises(ValueError, match="no binary variant"):
        run_trial(
            binary.model_copy(update={"loss": binary.loss.model_copy(update={"family": "cosine"})}),
            tracking=None,
            data_roots=[],
        )


def test_liptune_train_runs_a_spec_file(tmp_path):
    spec_file = tmp_path / "trial.yaml"
    spec_file.write_text(
        "name: cli\n"
        "dataset: {name: two-moons, n_samples: 400}\n"
        "model: {name: mlp, widths: [16, 16]}\n"
        "training: {epochs: 2, batch_size: 64}\n"
        "loss: {family: hkr, margin: 0.1}\n"
        "eps: [0.05]\n"
    )
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(
        json.dumps({"dataset": {"name": "mnist"}, "loss": {"family": "kr", "margin": -1}})
    )
    home = tmp_path / "home"
    done = subprocess.run(
        [str(LIPTUNE), "train", str(spec_file), "--data-dir", str(home), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "certified accuracy" in done.stdout and "epoch   2/2" in done.stdout
    assert "MLflow run: " in done.stdout and (home / "mlflow.db").is_file()
    invalid = subprocess.run(
        [str(LIPTUNE), "train", str(bad_file), "--data-dir", str(home)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert invalid.returncode == 2
    assert "invalid trial spec" in invalid.stderr
    assert "loss: Value error, loss family 'kr' takes no margin" in invalid.stderr
