"""One loss-conditioned network for the whole tau-CE front, against fixed trainings (issue 22).

On a study-efficiency task (``--task digits``, the default, or ``--task fashion``: the
``fashion-tau`` task, Fashion-MNIST 10,000-image subset, the convnet 16-32 with L2 pooling and a
64-unit dense layer, Adam 0.001, batch 128, 9 epochs per trial, study's eps 0.5, whose fixed
trainings are read from the dense table ``benchmarks/data/fashion.jsonl.gz`` instead of being
trained again; a temperature or seed the table lacks is trained). On the digits task (the MLP
64-64 of SpectralLinear + GroupSort2, Adam 0.005, batch 128, 10 epochs per trial, constant
learning rate) it trains

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
log-spaced ones (``--dense``; evaluations cost no training); the per-temperature gaps
(conditioned minus fixed, median and worst over seeds); and the certificate tightness of the
conditioned network at three temperatures (the trial's minimal-norm attack check).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/conditional.py --seeds 3
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/conditional.py --task fashion \
        --seeds 2 --out fashion.json
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

from study_efficiency import REPORT_EPS, TASKS, TEMPERATURES, hypervolume, read_table

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

#: The eps reported per task (the study's first): digits' as measured first, fashion's the
#: table's.
TASK_EPS = {"digits": (0.3, 0.5, 1.0), "fashion": (0.5, *(e for e in REPORT_EPS if e != 0.5))}
TASK_NAMES = {"digits": "digits", "fashion": "fashion-tau"}
EPS = TASK_EPS["digits"]
RANGE = LogRange(0.03, 100.0)
MULTIPLIERS = (1, 2, 4)
TIGHTNESS_TEMPERATURES = (0.1, 1.0, 10.0)


def evaluate(exported, splits) -> tuple[dict[str, float], object]:
    """A trial's test metrics of an exported network (certificates from its head bound)."""
    started = time.perf_counter()
    bound = head_bound(exported, splits.input_shape, exported.certificate_mode)
    test = predict(
        exported, splits.test.x, splits.test.y, exported.certificate_mode, lipschitz=bound
    )
    metrics = accuracy_metrics(test, EPS)
    metrics["eval_seconds"] = time.perf_counter() - started
    metrics["bound"] = bound
    return metrics, test


def point(metrics: dict[str, float], eps: float) -> tuple[float, float]:
    return metrics["accuracy"], metrics[f"certified_accuracy_eps_{eps:g}"]


def table_fixed(task, seed: int) -> dict[float, dict[str, float]]:
    """The dense table's tau-CE trainings of ``seed`` (last epoch's test metrics; their
    certificates divide by 1, trusting the layers, as the table's build does)."""
    results = {}
    for row in read_table(task):
        config = row["config"]
        if config["loss"] != "tau_ce" or row.get("seed", 0) != seed or not row["epochs"]:
            continue
        last = row["epochs"][-1]
        if len(row["epochs"]) != task.epochs or row.get("failure_reason"):
            continue
        metrics = {k.removeprefix("test_"): v for k, v in last.items() if k.startswith("test_")}
        metrics["seconds"] = sum(epoch["seconds"] for epoch in row["epochs"])
        results[float(config["temperature"])] = metrics
    return results


def train_fixed(task, seed: int, have: dict | None = None) -> dict[float, dict[str, float]]:
    results = dict(have or {})
    for temperature in TEMPERATURES:
        if temperature in results:
            continue
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
    return {t: results[t] for t in TEMPERATURES}


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
    parser.add_argument("--task", choices=sorted(TASK_NAMES), default="digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--scale", choices=("sigmoid", "tanh", "none"), default="sigmoid")
    parser.add_argument("--hidden", type=int, default=32, help="condition network width")
    parser.add_argument(
        "--multipliers",
        type=int,
        nargs="+",
        default=list(MULTIPLIERS),
        help="conditioned trainings, in multiples of one trial's epochs",
    )
    parser.add_argument(
        "--dense",
        type=int,
        default=None,
        help="log-spaced temperatures the network is also evaluated at (default: 33 on digits, "
        "0 on fashion, where one evaluation costs about 20 s: the convnet's guaranteed bound)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument(
        "--summarise", type=Path, nargs="+", default=None, help="only print the tables of files"
    )
    parser.add_argument(
        "--guided",
        type=int,
        default=0,
        metavar="SEEDS",
        help="only replay the default study (guided) on the task's dense table for SEEDS seeds "
        "and print its hypervolume at the multipliers' epochs, at each eps (aimed at it, and the "
        "study's own eps read there)",
    )
    args = parser.parse_args()
    if args.summarise:
        summarise_files(args.summarise, args.multipliers)
        return
    if args.guided:
        task = TASKS[TASK_NAMES[args.task]]
        epochs = [m * task.epochs for m in args.multipliers]
        replayed = guided_replay(task, TASK_EPS[args.task], epochs, args.guided)
        for way, by_eps in replayed.items():
            for eps, by_epochs in by_eps.items():
                print(
                    f"guided ({way}) at eps {eps}: "
                    + "; ".join(
                        f"{e} epochs: HV {q[1]:.3f} [{q[0]:.3f}, {q[2]:.3f}]"
                        for e, q in by_epochs.items()
                    )
                )
        if args.out is not None:
            args.out.write_text(json.dumps(replayed, indent=1))
        return
    torch.set_num_threads(1)
    global EPS
    EPS = TASK_EPS[args.task]
    task = TASKS[TASK_NAMES[args.task]]
    trial_epochs = task.epochs
    study_eps = EPS[0]
    count = args.dense if args.dense is not None else (33 if args.task == "digits" else 0)
    dense_temperatures = (
        tuple(float(t) for t in torch.logspace(-1.5229, 2.0, count).tolist()) if count else ()
    )
    report: dict = {
        "task": args.task,
        "eps": list(EPS),
        "trial_epochs": trial_epochs,
        "scale": args.scale,
        "hidden": args.hidden,
        "dense": count,
        "seeds": [],
    }
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        have = table_fixed(task, seed) if args.task == "fashion" else {}
        fixed = train_fixed(task, seed, have)
        entry = {"seed": seed, "fixed": {str(t): m for t, m in fixed.items()}, "conditioned": {}}
        fixed_seconds = sum(m["seconds"] for m in fixed.values())
        for eps in EPS:
            entry[f"hv_fixed_{eps:g}"] = hypervolume([point(m, eps) for m in fixed.values()])
        print(
            f"seed {seed}: fixed 8 x {trial_epochs} epochs, {fixed_seconds:.1f} s "
            f"({len(have)} from the table)",
            flush=True,
        )
        for multiplier in args.multipliers:
            network, splits, seconds = train_conditioned(
                task, seed, multiplier * trial_epochs, args.scale, args.hidden
            )
            if args.out is not None:  # the network itself, to look at again without retraining
                torch.save(network.state_dict(), args.out.with_suffix(f".s{seed}.x{multiplier}.pt"))
            cond = {t: evaluate(at(network, t), splits)[0] for t in TEMPERATURES}
            dense = [evaluate(at(network, t), splits)[0] for t in dense_temperatures]
            result = {
                "epochs": multiplier * trial_epochs,
                "seconds": seconds,
                "at": {str(t): m for t, m in cond.items()},
                "max_bound": max(m["bound"] for m in [*cond.values(), *dense]),
            }
            for eps in EPS:
                result[f"hv_{eps:g}"] = hypervolume([point(m, eps) for m in cond.values()])
                result[f"hv_dense_{eps:g}"] = hypervolume(
                    [point(m, eps) for m in dense] if dense else []
                )
            result["eval_seconds_median"] = statistics.median(
                m["eval_seconds"] for m in [*cond.values(), *dense]
            )
            result["gap_accuracy"] = gaps(fixed, cond, "accuracy")
            for eps in EPS:
                key = f"certified_accuracy_eps_{eps:g}"
                result[f"gap_certified_{eps:g}"] = gaps(fixed, cond, key)
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
            hv = "; ".join(
                f"HV@{e:g} {result[f'hv_{e:g}']:.3f} (dense {result[f'hv_dense_{e:g}']:.3f}) "
                f"vs fixed {entry[f'hv_fixed_{e:g}']:.3f}"
                for e in EPS
            )
            print(
                f"  conditioned {multiplier}x ({multiplier * trial_epochs} epochs, "
                f"{seconds:.1f} s): {hv}; max bound {result['max_bound']:.6f}; "
                f"{result['eval_seconds_median']:.2f} s per evaluation",
                flush=True,
            )
            if args.out is not None:  # partial results survive an interrupted run
                args.out.write_text(json.dumps({**report, "seeds": [*report["seeds"], entry]}))
        report["seeds"].append(entry)
        if args.out is not None:
            args.out.write_text(json.dumps(report, indent=1))
    summarise(report, args.multipliers, study_eps)


def summarise(report: dict, multipliers: list[int], study_eps: float) -> None:
    """Markdown tables: hypervolume shares of the fixed front (median [min-max] over seeds),
    the per-temperature gaps (median / worst) and the tightness of the last multiplier."""
    seeds = [s for s in report["seeds"] if all(str(m) in s["conditioned"] for m in multipliers)]
    eps_list = report.get("eps", list(EPS))
    trial_epochs = report.get("trial_epochs", 10)

    def med(values):
        return f"{statistics.median(values):.3f}"

    def share(values):
        values = [100 * v for v in values]
        return f"{statistics.median(values):.0f} % [{min(values):.0f}-{max(values):.0f}]"

    print(
        "\nfixed front, per seed: "
        + "; ".join(
            f"HV@{e:g} " + " / ".join(f"{s[f'hv_fixed_{e:g}']:.3f}" for s in seeds)
            for e in eps_list
        )
    )
    count = report.get("dense", 33)
    header = " | ".join(f"HV@{e:g}" for e in eps_list)
    if count:
        header += " | " + " | ".join(f"HV@{e:g}, {count} temps" for e in eps_list)
    print(f"\n| conditioned network | epochs (fixed: {8 * trial_epochs}) | {header} |")
    print("|---|---|" + "---|" * ((2 if count else 1) * len(eps_list)))
    for multiplier in multipliers:
        runs = [(s, s["conditioned"][str(multiplier)]) for s in seeds]
        cells = [share([r[f"hv_{e:g}"] / s[f"hv_fixed_{e:g}"] for s, r in runs]) for e in eps_list]
        for e in eps_list if count else ():
            shares = [100 * r[f"hv_dense_{e:g}"] / s[f"hv_fixed_{e:g}"] for s, r in runs]
            cells.append(f"{statistics.median(shares):.0f} %")
        print(f"| {multiplier}x | {runs[0][1]['epochs']} | " + " | ".join(cells) + " |")
    print(
        f"\nper-temperature gap, conditioned minus fixed (points), median / worst over seeds "
        f"(certified at {study_eps:g})"
    )
    print("| temperature | " + " | ".join(f"{m}x acc | {m}x cert" for m in multipliers) + " |")
    print("|---" * (1 + 2 * len(multipliers)) + "|")
    for i, t in enumerate(TEMPERATURES):
        cells = []
        for multiplier in multipliers:
            for key in ("gap_accuracy", f"gap_certified_{study_eps:g}"):
                values = [100 * s["conditioned"][str(multiplier)][key][i] for s in seeds]
                cells.append(f"{statistics.median(values):+.1f} / {min(values):+.1f}")
        print(f"| {t:g} | " + " | ".join(cells) + " |")
    print(f"\ncertificate tightness of the {multipliers[-1]}x network (radius / attack distance)")
    for s in seeds:
        tight = s["conditioned"][str(multipliers[-1])].get("tightness")
        print(f"seed {s['seed']}: " + json.dumps(tight))


def guided_replay(task, eps_list, epochs_list: list[int], seeds: int) -> dict[str, dict]:
    """The default study (``guided``, no pruner) replayed on the task's dense table
    (:mod:`study_efficiency`'s replay, each trial one of the table's trainings): the quartiles
    over ``seeds`` of its hypervolume once each of ``epochs_list`` (the conditioned network's
    budgets) was spent, at each eps, two ways: ``aimed``, the study run with its objective at
    that eps (its ladder starts where that eps is certified), and ``read``, the study at the
    task's own eps read at that eps (the whole-front question: one study, many eps)."""
    import warnings

    import optuna
    from study_efficiency import METHODS, Replay, at_eps

    class Recording(Replay):
        """A replay that keeps the trainings its trials got, in order."""

        def __init__(self, task) -> None:
            super().__init__(task)
            self.chosen: list[list[dict]] = []

        def epochs_of(self, config, rng):
            rows = super().epochs_of(config, rng)
            self.chosen.append(rows)
            return rows

    def read_at(chosen: list[list[dict]], eps: float, epochs: int) -> float:
        points, spent = [], 0
        for rows in chosen:
            spent += len(rows)
            if spent > epochs:
                break
            if len(rows) == task.epochs:
                last = rows[-1]
                points.append((last["test_accuracy"], last[f"test_certified_accuracy_eps_{eps:g}"]))
        return hypervolume(points)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    budget = max(epochs_list)
    chosen = []
    for seed in range(seeds):
        table = Recording(task)
        METHODS["guided"](table, seed, budget)
        chosen.append(table.chosen)
    out: dict[str, dict] = {"aimed": {}, "read": {}}
    for eps in eps_list:
        table = Replay(task if eps == task.eps else at_eps(task, eps))
        traces = [METHODS["guided"](table, seed, budget) for seed in range(seeds)]
        out["aimed"][f"{eps:g}"] = {
            str(e): statistics.quantiles([t.at(e) for t in traces], n=4) for e in epochs_list
        }
        out["read"][f"{eps:g}"] = {
            str(e): statistics.quantiles([read_at(c, eps, e) for c in chosen], n=4)
            for e in epochs_list
        }
    return out


def summarise_files(paths: list[Path], multipliers: list[int]) -> None:
    """:func:`summarise` over the seeds of several ``--out`` files of one task."""
    reports = [json.loads(path.read_text()) for path in paths]
    merged = {**reports[0], "seeds": [s for r in reports for s in r["seeds"]]}
    summarise(merged, multipliers, merged["eps"][0])


if __name__ == "__main__":
    main()
