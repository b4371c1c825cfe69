"""One loss-conditioned network for the whole tau-CE front, against fixed trainings (issue 22).

On the study-efficiency digits task (the MLP 64-64 of SpectralLinear + GroupSort2, Adam 0.005,
batch 128, 10 epochs per trial, constant learning rate) it trains

- the fixed networks: one per temperature of the study-efficiency ladder (0.03 ... 100, eight),
  10 epochs each, with liptune's own training loop (:func:`worker.trial._training.train`), as the
  dense table's ``build`` does;
- one conditioned network (:func:`liptune.nn.conditioned`: a FiLM layer after each hidden layer,
  scale in [1e-3, 1], free shift, from a 32-unit network of the condition), each example of each
  batch at its own temperature drawn log-uniformly from [0.03, 100], its loss tau-CE at that
  temperature, the condition the normalised log-temperature; trained for 1x, 2x and 4x one
  trial's epochs (10, 20, 40), the same optimiser, batch size and learning rate.

Every network is evaluated as a trial is: exported (the conditioned one at each temperature
with :func:`liptune.export.vanilla_export_at`), its guaranteed head bound, certificates
margin / (sqrt(2) L) on the test split. Reported: hypervolume of (test accuracy, certified
accuracy at eps) above (0.1, 0) for eps 0.3 (the study's) 0.5 and 1.0, of the fixed networks'
front and of the conditioned network evaluated at the same eight temperatures and at 33
log-spaced ones (evaluations cost no training); the per-temperature gaps (conditioned minus
fixed, median and worst over seeds); and the certificate tightness of the conditioned network
at three temperatures (the trial's minimal-norm attack check).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/conditional.py --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from study_efficiency import TASKS, TEMPERATURES, hypervolume

from liptune.bounds import head_bound
from liptune.export import vanilla_export, vanilla_export_at
from liptune.losses import TauCrossEntropyLoss
from liptune.nn import LogRange, conditioned
from worker.common._paths import default_data_roots, liptune_home
from worker.trial._evaluation import accuracy_metrics, predict
from worker.trial._losses import build_loss
from worker.trial._models import build_model
from worker.trial._run import _attack_certificates
from worker.trial._training import make_optimizer, train
from worker.trial.datasets import load_dataset

EPS = (0.3, 0.5, 1.0)
RANGE = LogRange(0.03, 100.0)
MULTIPLIERS = (1, 2, 4)
DENSE = tuple(float(t) for t in torch.logspace(-1.5229, 2.0, 33).tolist())  # 0.03 ... 100
TIGHTNESS_TEMPERATURES = (0.1, 1.0, 10.0)


def evaluate(exported, splits) -> tuple[dict[str, float], object]:
    """A trial's test metrics of an exported network (certificates from its head bound)."""
    bound = head_bound(exported, splits.input_shape, exported.certificate_mode)
    test = predict(
        exported, splits.test.x, splits.test.y, exported.certificate_mode, lipschitz=bound
    )
    metrics = accuracy_metrics(test, EPS)
    metrics["bound"] = bound
    return metrics, test


def point(metrics: dict[str, float], eps: float) -> tuple[float, float]:
    return metrics["accuracy"], metrics[f"certified_accuracy_eps_{eps:g}"]


def train_fixed(task, seed: int) -> dict[float, dict[str, float]]:
    results = {}
    for temperature in TEMPERATURES:
        spec = task.spec.trial_spec({"loss": "tau_ce", "temperature": temperature}, seed=seed)
        splits = load_dataset(
            spec.dataset, data_roots=default_data_roots(liptune_home()), seed=spec.seed
        )
        torch.manual_seed(spec.seed)
        model = build_model(spec.model, splits.input_shape, splits.num_classes)
        run = train(
            model,
            build_loss(spec.loss, splits.task),
            splits,
            spec.training,
            eps=spec.eps,
            mode=model.certificate_mode,
            device=torch.device("cpu"),
            seed=spec.seed,
        )
        metrics, _ = evaluate(vanilla_export(model), splits)
        metrics["seconds"] = run.seconds
        results[temperature] = metrics
    return results


def train_conditioned(task, seed: int, epochs: int, scale: str = "sigmoid", hidden: int = 32):
    """The conditioned network after ``epochs`` epochs (a fresh training), its data splits and
    its training seconds."""
    spec = task.spec.trial_spec({"loss": "tau_ce", "temperature": 1.0}, seed=seed)
    splits = load_dataset(
        spec.dataset, data_roots=default_data_roots(liptune_home()), seed=spec.seed
    )
    torch.manual_seed(spec.seed)
    base = build_model(spec.model, splits.input_shape, splits.num_classes)
    network = conditioned(base, 1, hidden=hidden, scale=scale)
    optimizer = make_optimizer(network, spec.training)
    loss_fn = TauCrossEntropyLoss()
    generator = torch.Generator().manual_seed(spec.seed)
    x, y = splits.train.x, splits.train.y
    started = time.perf_counter()
    network.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(spec.training.batch_size):
            temperatures = RANGE.sample(len(batch), generator=generator)
            condition = RANGE.normalise(temperatures)[:, None]
            loss = loss_fn(network(x[batch], condition), y[batch], temperature=temperatures)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return network.eval(), splits, time.perf_counter() - started


def at(network, temperature: float):
    return vanilla_export_at(network, RANGE.normalise(torch.tensor([temperature])))


def gaps(fixed, cond, key: str) -> list[float]:
    return [cond[t][key] - fixed[t][key] for t in TEMPERATURES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scale", choices=("sigmoid", "tanh", "none"), default="sigmoid")
    parser.add_argument("--hidden", type=int, default=32, help="condition network width")
    parser.add_argument(
        "--multipliers",
        type=int,
        nargs="+",
        default=list(MULTIPLIERS),
        help="conditioned trainings, in multiples of one trial's epochs",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = TASKS["digits"]
    trial_epochs = task.epochs
    report: dict = {"scale": args.scale, "hidden": args.hidden, "seeds": []}
    for seed in range(args.seeds):
        fixed = train_fixed(task, seed)
        entry = {"seed": seed, "fixed": {str(t): m for t, m in fixed.items()}, "conditioned": {}}
        fixed_seconds = sum(m["seconds"] for m in fixed.values())
        for eps in EPS:
            entry[f"hv_fixed_{eps:g}"] = hypervolume([point(m, eps) for m in fixed.values()])
        print(f"seed {seed}: fixed 8 x {trial_epochs} epochs, {fixed_seconds:.1f} s", flush=True)
        for multiplier in args.multipliers:
            network, splits, seconds = train_conditioned(
                task, seed, multiplier * trial_epochs, args.scale, args.hidden
            )
            cond = {t: evaluate(at(network, t), splits)[0] for t in TEMPERATURES}
            dense = [evaluate(at(network, t), splits)[0] for t in DENSE]
            result = {
                "epochs": multiplier * trial_epochs,
                "seconds": seconds,
                "at": {str(t): m for t, m in cond.items()},
                "max_bound": max(m["bound"] for m in [*cond.values(), *dense]),
            }
            for eps in EPS:
                result[f"hv_{eps:g}"] = hypervolume([point(m, eps) for m in cond.values()])
                result[f"hv_dense_{eps:g}"] = hypervolume([point(m, eps) for m in dense])
            result["gap_accuracy"] = gaps(fixed, cond, "accuracy")
            result["gap_certified_0.3"] = gaps(fixed, cond, "certified_accuracy_eps_0.3")
            result["gap_certified_0.5"] = gaps(fixed, cond, "certified_accuracy_eps_0.5")
            if multiplier == args.multipliers[-1]:
                tightness = {}
                for t in TIGHTNESS_TEMPERATURES:
                    exported = at(network, t)
                    _, test = evaluate(exported, splits)
                    summary = _attack_certificates(exported, splits, test, seed)
                    tightness[str(t)] = {
                        "points": summary.points,
                        "violations": summary.violations,
                        "median": summary.tightness_median,
                        "p10": summary.tightness_p10,
                        "p90": summary.tightness_p90,
                    }
                result["tightness"] = tightness
            entry["conditioned"][str(multiplier)] = result
            print(
                f"  conditioned {multiplier}x ({multiplier * trial_epochs} epochs, "
                f"{seconds:.1f} s): HV@0.3 {result['hv_0.3']:.3f} (dense "
                f"{result['hv_dense_0.3']:.3f}) vs fixed {entry['hv_fixed_0.3']:.3f}; "
                f"HV@0.5 {result['hv_0.5']:.3f} (dense {result['hv_dense_0.5']:.3f}) vs "
                f"{entry['hv_fixed_0.5']:.3f}; max bound {result['max_bound']:.6f}",
                flush=True,
            )
        report["seeds"].append(entry)
    summarise(report, args.multipliers)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))


def summarise(report: dict, multipliers: list[int]) -> None:
    seeds = report["seeds"]
    print("\n| network | epochs | HV@0.3 | HV@0.5 | HV@1.0 | HV@0.3, 33 temps | HV@0.5, 33 temps |")
    print("|---|---|---|---|---|---|---|")

    def med(values):
        return f"{statistics.median(values):.3f}"

    print(
        f"| fixed, 8 temperatures | {8 * 10} | "
        + " | ".join(med([s[f"hv_fixed_{e:g}"] for s in seeds]) for e in EPS)
        + " | | |"
    )
    for multiplier in multipliers:
        runs = [s["conditioned"][str(multiplier)] for s in seeds]
        print(
            f"| conditioned {multiplier}x | {runs[0]['epochs']} | "
            + " | ".join(med([r[f"hv_{e:g}"] for r in runs]) for e in EPS)
            + f" | {med([r['hv_dense_0.3'] for r in runs])} | "
            + f"{med([r['hv_dense_0.5'] for r in runs])} |"
        )
    print("\nper-temperature gap, conditioned minus fixed (points), median / worst over seeds")
    print("| temperature | " + " | ".join(f"{m}x acc | {m}x cert@0.3" for m in multipliers) + " |")
    print("|---" * (1 + 2 * len(multipliers)) + "|")
    for i, t in enumerate(TEMPERATURES):
        cells = []
        for multiplier in multipliers:
            for key in ("gap_accuracy", "gap_certified_0.3"):
                values = [100 * s["conditioned"][str(multiplier)][key][i] for s in seeds]
                cells.append(f"{statistics.median(values):+.1f} / {min(values):+.1f}")
        print(f"| {t:g} | " + " | ".join(cells) + " |")
    print(f"\ncertificate tightness of the {multipliers[-1]}x network (radius / attack distance)")
    for s in seeds:
        tight = s["conditioned"][str(multipliers[-1])]["tightness"]
        print(f"seed {s['seed']}: " + json.dumps(tight))


if __name__ == "__main__":
    main()
