"""What a trial spends outside training: the share of a 10-epoch digits trial that goes to
loading cached data, exporting, bounding, evaluating and logging to MLflow.

A first trial warms the process up (imports, MLflow's database creation, the ONNX exporter's
first call); the next ``--repeats`` trials are measured. ``training`` is the epoch loop (each
epoch's validation included); everything else is overhead. ``tracking`` includes ``onnx``.

    .venv/bin/python benchmarks/trial_overhead.py [--repeats 3] [--threads 1] [--model mlp]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from worker.spec import TrialSpec
from worker.tracking._mlflow import TrackingConfig
from worker.trial._run import run_trial

# L2 pooling as when the recorded figures were measured (the zoo's default is now invertible).
MODELS = {
    "mlp": {"name": "mlp", "widths": [128, 128]},
    "convnet": {"name": "convnet", "channels": [16, 32], "dense_widths": [64], "pooling": "l2"},
}
PHASES = ("data", "export", "lipschitz_bound", "evaluation", "onnx", "tracking")


def digits_spec(model: str) -> TrialSpec:
    return TrialSpec.model_validate(
        {
            "name": "overhead",
            "dataset": {"name": "digits"},
            "model": MODELS[model],
            "training": {"epochs": 10, "batch_size": 128},
            "loss": {"family": "hkr", "alpha_kr": 50, "margin": 0.5},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = digits_spec(args.model)
    with tempfile.TemporaryDirectory() as home:
        config = TrackingConfig.for_home(Path(home))
        started = time.perf_counter()
        run_trial(spec, tracking=config, data_roots=[])
        print(
            f"warm-up trial (imports, MLflow DB, first ONNX export): "
            f"{time.perf_counter() - started:.2f} s"
        )
        rows = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = run_trial(spec, tracking=config, data_roots=[])
            total = time.perf_counter() - started
            rows.append({**result.timings, "total": total})
    medians = {key: statistics.median(row.get(key, 0.0) for row in rows) for key in rows[0]}
    total, training = medians["total"], medians["training"]
    print(
        f"\n10-epoch digits {args.model} trial, {args.threads} thread(s), median of {args.repeats}:"
    )
    print(f"{'phase':>16}  {'seconds':>8}  {'share':>6}")
    for phase in ("training", *PHASES):
        print(
            f"{phase:>16}  {medians.get(phase, 0.0):>8.3f}  {medians.get(phase, 0.0) / total:>6.1%}"
        )
    overhead = total - training
    onnx = medians.get("onnx", 0.0)
    print(f"{'total':>16}  {total:>8.3f}")
    print(f"\noverhead (all but training): {overhead:.3f} s = {overhead / total:.1%} of the trial")
    print(f"overhead without the ONNX export: {(overhead - onnx) / (total - onnx):.1%}")


if __name__ == "__main__":
    main()
