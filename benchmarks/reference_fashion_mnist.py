"""Reference run: the core benchmark's Fashion-MNIST network trained with multiclass HKR.

Network (the one deel-torchlip's tutorial trains to 86.4 % validation accuracy with its LseHKR
loss): SpectralConv2d 1->16, GroupSort2, L2-norm pool, SpectralConv2d 16->32, GroupSort2,
L2-norm pool, SpectralLinear 1568->64, GroupSort2, SpectralLinear 64->10. Loss: multiclass HKR
with alpha_kr = 100 and margin = 0.5 (hinge relu(0.25 - (f_y - f_j))), Adam lr 1e-3, batch 128,
15 epochs. Prints each epoch (validation accuracy and certified accuracy at 0.1), then the test
accuracy, certified accuracy at eps 0.1, 0.25, 0.5, 1.0 and the wall time per epoch.

    .venv/bin/python benchmarks/reference_fashion_mnist.py [--epochs 15] [--threads 2]
        [--n-samples N] [--mlflow URI]

Takes a while on a 2-core CPU; ``--epochs 1 --n-samples 5000`` checks that it runs.
"""

from __future__ import annotations

import argparse
import time

from worker.paths import SYSTEM_DATA_ROOT, default_data_roots, liptune_home
from worker.spec import TrialSpec, metric_key
from worker.tracking import TrackingConfig
from worker.trial import run_trial

EPS = [0.1, 0.25, 0.5, 1.0]


def reference_spec(epochs: int, n_samples: int | None, threads: int | None) -> TrialSpec:
    return TrialSpec.model_validate(
        {
            "name": "reference-fashion-mnist",
            "dataset": {"name": "fashion-mnist", "n_samples": n_samples},
            "model": {
                "name": "convnet",
                "channels": [16, 32],
                "convs_per_stage": 1,
                "kernel_size": 3,
                "pooling": "l2",
                "dense_widths": [64],
                "head": "global",
            },
            "training": {"epochs": epochs, "batch_size": 128, "lr": 1e-3, "threads": threads},
            "loss": {"family": "hkr", "alpha_kr": 100.0, "margin": 0.5},
            "eps": EPS,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--n-samples", type=int, default=None, help="subsample the train split")
    parser.add_argument("--mlflow", metavar="URI", help="log the run there (default: no MLflow)")
    args = parser.parse_args()
    spec = reference_spec(args.epochs, args.n_samples, args.threads)
    tracking = TrackingConfig(args.mlflow, None) if args.mlflow else None

    def show(record: dict) -> None:
        print(
            f"epoch {record['epoch']:>2}/{args.epochs}  loss {record['train_loss']:.4f}  "
            f"val acc {record['val_accuracy']:.4f}  "
            f"val cert@0.1 {record['val_certified_accuracy_eps_0.1']:.4f}  "
            f"{record['seconds']:.1f} s",
            flush=True,
        )

    started = time.perf_counter()
    result = run_trial(
        spec,
        tracking=tracking,
        data_roots=[*default_data_roots(liptune_home()), SYSTEM_DATA_ROOT],
        on_epoch=show,
    )
    wall = time.perf_counter() - started
    if result.status != "completed":
        raise SystemExit(f"trial {result.status}: {result.failure_reason}")
    metrics = result.metrics
    print(f"\ntest accuracy {metrics['accuracy']:.4f} (deel-torchlip tutorial: 0.864 validation)")
    for eps in EPS:
        print(
            f"certified accuracy eps={eps:g}: {metrics[metric_key('certified_accuracy', eps)]:.4f}"
        )
    per_epoch = metrics["training_time"] / len(result.epochs)
    print(f"wall time per epoch {per_epoch:.1f} s (validation included); trial {wall:.1f} s")
    print(
        f"Lipschitz bound {metrics['lipschitz_bound']:.6f}; best val accuracy "
        f"{max(r['val_accuracy'] for r in result.epochs):.4f}"
    )


if __name__ == "__main__":
    main()
