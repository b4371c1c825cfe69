"""Reference run: the core benchmark's Fashion-MNIST network trained with multiclass HKR.

Network (the one deel-torchlip's tutorial trains to 86.4 % validation accuracy with its LseHKR
loss): SpectralConv2d 1->16, GroupSort2, L2-norm pool, SpectralConv2d 16->32, GroupSort2,
L2-norm pool, SpectralLinear 1568->64, GroupSort2, SpectralLinear 64->10. Loss: multiclass HKR
with alpha_kr = 100 and margin = 0.5 (hinge relu(0.25 - (f_y - f_j))), Adam lr 1e-3, batch 128,
15 epochs. Prints each epoch (validation accuracy and certified accuracy at 0.1), then the test
accuracy, certified accuracy at eps 0.1, 0.25, 0.5, 1.0 and the wall time per epoch.

``--conv aol|bcop`` swaps the convolution family (``spectral`` is the default), ``--pooling
invertible`` the L2-norm pooling for space-to-depth downsampling; ``--alpha-kr``/``--margin``
the HKR settings (for a front of several settings per family). ``--tightness N`` attacks the
correctly classified ones among the first N test points with
:func:`liptune.attacks.minimal_l2_attack` (100 steps, float64) and prints the certificate
tightness, radius / distance to the nearest adversarial example found (median, p10, p90), the
violations (an adversarial example closer than the certified radius; must be 0), and the median
:func:`liptune.certify.gradient_norm_ratio` (the first-order tightness: how much of the bound
the margin's slope uses). Radii divide by the trial's guaranteed Lipschitz bound.

    .venv/bin/python benchmarks/reference_fashion_mnist.py [--epochs 15] [--threads 2]
        [--n-samples N] [--mlflow URI] [--conv spectral|aol|bcop] [--alpha-kr A]
        [--pooling l2|invertible] [--margin M] [--tightness N] [--json PATH]

Takes a while on a 2-core CPU; ``--epochs 1 --n-samples 5000`` checks that it runs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from liptune.attacks import certificate_check, minimal_l2_attack
from liptune.certify import certificate_mode, gradient_norm_ratio, predict_with_certificates
from worker.common._paths import SYSTEM_DATA_ROOT, default_data_roots, liptune_home
from worker.spec import TrialSpec, metric_key
from worker.tracking._mlflow import TrackingConfig
from worker.trial._run import run_trial
from worker.trial.datasets._loading import load_dataset

EPS = [0.1, 0.25, 0.5, 1.0]


def reference_spec(
    epochs: int,
    n_samples: int | None,
    threads: int | None,
    conv: str = "spectral",
    pooling: str = "l2",
    alpha_kr: float = 100.0,
    margin: float = 0.5,
) -> TrialSpec:
    return TrialSpec.model_validate(
        {
            "name": "reference-fashion-mnist",
            "dataset": {"name": "fashion-mnist", "n_samples": n_samples},
            "model": {
                "name": "convnet",
                "channels": [16, 32],
                "convs_per_stage": 1,
                "kernel_size": 3,
                "pooling": pooling,
                "dense_widths": [64],
                "head": "global",
                "conv": conv,
            },
            "training": {"epochs": epochs, "batch_size": 128, "lr": 1e-3, "threads": threads},
            "loss": {"family": "hkr", "alpha_kr": alpha_kr, "margin": margin},
            "eps": EPS,
        }
    )


def tightness(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lipschitz: float
) -> dict[str, float | int | None]:
    """Certificate tightness on the correctly classified points of ``(x, y)``; see the module
    docstring."""
    mode = certificate_mode(model)
    _, predicted, radii = predict_with_certificates(model, x, mode=mode, lipschitz=lipschitz)
    correct = predicted == y
    distances = minimal_l2_attack(model, x[correct], y[correct], steps=100)
    summary = certificate_check(radii[correct], distances)
    ratios = gradient_norm_ratio(model, x[correct], mode, lipschitz=lipschitz)
    summary["gradient_norm_ratio_median"] = ratios.median().item()
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--n-samples", type=int, default=None, help="subsample the train split")
    parser.add_argument("--mlflow", metavar="URI", help="log the run there (default: no MLflow)")
    parser.add_argument("--conv", default="spectral", choices=["spectral", "aol", "bcop"])
    parser.add_argument("--pooling", default="l2", choices=["l2", "invertible"])
    parser.add_argument("--alpha-kr", type=float, default=100.0)
    parser.add_argument("--margin", type=float, default=0.5)
    parser.add_argument("--tightness", type=int, default=0, metavar="N", help="attacked points")
    parser.add_argument("--json", metavar="PATH", help="append the figures as one JSON line")
    args = parser.parse_args()
    spec = reference_spec(
        args.epochs,
        args.n_samples,
        args.threads,
        args.conv,
        args.pooling,
        args.alpha_kr,
        args.margin,
    )
    tracking = TrackingConfig(args.mlflow, None) if args.mlflow else None

    def show(record: dict) -> None:
        print(
            f"epoch {record['epoch']:>2}/{args.epochs}  loss {record['train_loss']:.4f}  "
            f"val acc {record['val_accuracy']:.4f}  "
            f"val cert@0.1 {record['val_certified_accuracy_eps_0.1']:.4f}  "
            f"{record['seconds']:.1f} s",
            flush=True,
        )

    data_roots = [*default_data_roots(liptune_home()), SYSTEM_DATA_ROOT]
    started = time.perf_counter()
    result = run_trial(
        spec,
        tracking=tracking,
        data_roots=data_roots,
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
    figures = {
        "conv": args.conv,
        "pooling": args.pooling,
        "alpha_kr": args.alpha_kr,
        "margin": args.margin,
        "epochs": args.epochs,
        "n_samples": args.n_samples,
        "seconds_per_epoch": per_epoch,
        **{k: v for k, v in metrics.items() if isinstance(v, float)},
    }
    if args.tightness:
        test = load_dataset(spec.dataset, data_roots=data_roots, seed=spec.seed).test
        with torch.no_grad():
            model = result.model.float()
        if args.threads:
            torch.set_num_threads(args.threads)
        x, y = test.x[: args.tightness], test.y[: args.tightness]
        figures["attack"] = tightness(model, x, y, metrics["lipschitz_bound"])
        print("certificate tightness (minimal_l2_attack):", figures["attack"])
    if args.json:
        with open(args.json, "a") as out:
            out.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
