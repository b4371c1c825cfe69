"""Does training augmentation move the front at a longer budget? (issue 23)

The Fashion-MNIST reference conv net (invertible pooling, 10,000 training images, batch 128) is
trained for ``--epochs`` epochs with one setting per loss family, once without augmentation and
once with random crops (2 pixels) and left-right flips (``training.augment``), and evaluated as a
trial is: test accuracy and certified accuracy at eps 0.25, 0.5 and 1.0 from the guaranteed
bound. Trainings run two at a time, one torch thread each.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/augmentation.py --epochs 30
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_fashion_mnist import reference_spec

#: One setting per family, near each family's knee on this task (benchmarks/README.md,
#: "Offset cross-entropy on Fashion-MNIST").
SETTINGS = {
    "hkr": {"family": "hkr", "margin": 0.5, "alpha_kr": 100.0},
    "tau_ce": {"family": "tau_ce", "temperature": 1.0},
    "offset_ce": {"family": "offset_ce", "margin": 0.35, "temperature": 2.0},
}
AUGMENT = {"random_crop": 2, "horizontal_flip": True}
EPS = (0.25, 0.5, 1.0)


def run(name: str, augmented: bool, epochs: int, n_samples: int, seed: int) -> dict:
    import torch

    from worker.spec import TrialSpec
    from worker.trial._run import run_trial

    torch.set_num_threads(1)
    base = reference_spec(epochs, n_samples, 1, pooling="invertible")
    data = base.model_dump(mode="json")
    data["loss"] = SETTINGS[name]
    data["training"]["augment"] = AUGMENT if augmented else None
    data["eps"] = list(EPS)
    data["seed"] = seed
    started = time.perf_counter()
    result = run_trial(TrialSpec.model_validate(data), tracking=None)
    metrics = result.metrics
    return {
        "family": name,
        "augmented": augmented,
        "seed": seed,
        "status": result.status,
        "accuracy": metrics.get("accuracy"),
        **{f"certified_{eps:g}": metrics.get(f"certified_accuracy_eps_{eps:g}") for eps in EPS},
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--n-samples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="+", default=list(SETTINGS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    jobs = [(name, augmented) for name in args.families for augmented in (False, True)]
    with ProcessPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(run, name, augmented, args.epochs, args.n_samples, args.seed)
            for name, augmented in jobs
        ]
        rows = []
        for future in futures:
            rows.append(future.result())
            print(json.dumps(rows[-1]), flush=True)
    print("\n| family | augmentation | accuracy | cert. 0.25 | cert. 0.5 | cert. 1.0 |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['family']} | {'crop 2 + flip' if row['augmented'] else 'none'} "
            f"| {row['accuracy']:.4f} | {row['certified_0.25']:.4f} | {row['certified_0.5']:.4f} "
            f"| {row['certified_1']:.4f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
