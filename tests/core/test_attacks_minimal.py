"""The minimal-norm attack against the certificates of trained digits models: none broken."""

import pytest
import torch

from liptune import certify
from liptune.attacks import certificate_check, minimal_l2_attack
from worker.spec import TrialSpec
from worker.trial._run import run_trial
from worker.trial.datasets import load_dataset


def trained(model: dict, epochs: int):
    spec = TrialSpec.model_validate(
        {
            "name": "attack-test",
            "dataset": {"name": "digits"},
            "model": model,
            "training": {"epochs": epochs, "batch_size": 64, "lr": 3e-3, "threads": 1},
            "loss": {"family": "hkr", "alpha_kr": 50, "margin": 0.5},
            "eps": [0.1],
        }
    )
    result = run_trial(spec, tracking=None, data_roots=[])
    assert result.status == "completed"
    splits = load_dataset(spec.dataset, data_roots=[], seed=0)
    return result, splits


@pytest.mark.parametrize(
    ("model", "epochs", "median"),
    [
        ({"name": "mlp", "widths": [64, 64]}, 6, 0.6),
        ({"name": "convnet", "channels": [8], "dense_widths": [32]}, 3, 0.2),
    ],
)
def test_no_attack_gets_below_a_certificate(model, epochs, median):
    result, splits = trained(model, epochs)
    x, y = splits.test.x[:150], splits.test.y[:150]
    mode = result.certificate_mode
    bound = result.metrics["lipschitz_bound"]
    _, predicted, radii = certify.predict_with_certificates(
        result.model, x, mode=mode, lipschitz=bound
    )
    correct = predicted == y
    distances = minimal_l2_attack(result.model, x[correct], y[correct], steps=100)
    summary = certificate_check(radii[correct], distances)
    assert summary["points"] == int(correct.sum()) > 50
    assert summary["violations"] == 0
    assert summary["tightness_p10"] <= summary["tightness_median"] <= summary["tightness_p90"] <= 1
    # The attack is strong enough to matter: it finds boundaries near the certificates.
    assert summary["tightness_median"] > median
    print(model["name"], summary)


def test_a_broken_certificate_is_a_violation():
    summary = certificate_check(torch.tensor([0.5, 0.2]), torch.tensor([0.4, 0.3]))
    assert summary["violations"] == 1 and summary["points"] == 2
