"""``liptune demo``: train and certify a small 1-Lipschitz MLP on scikit-learn's digits.

Takes seconds on a laptop CPU; prints the clean and certified accuracy and the MLflow run.
"""

from __future__ import annotations

import argparse

from service.commands.train import add_common_arguments, execute

HELP = "train and certify a small model on the digits data set"

DEMO_SPEC = {
    "name": "demo",
    "dataset": {"name": "digits"},
    "model": {"name": "mlp", "widths": [128, 128]},
    "training": {"epochs": 10, "batch_size": 128, "lr": 1e-3},
    "loss": {"family": "hkr", "alpha_kr": 50.0, "margin": 0.5},
    "eps": [0.1, 0.25, 0.5, 1.0],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from worker.spec import TrialSpec

    spec = TrialSpec.model_validate(DEMO_SPEC)
    print("liptune demo: a 1-Lipschitz MLP on the 8x8 digits, multiclass HKR loss")
    return execute(spec, args)
