"""Study efficiency: how many training epochs a study needs before its front is good.

Two steps, as tabular HPO benchmarks do (Syne Tune's blackbox repository and simulator backend):

``build``
    trains a dense set of configurations of a task ONCE with liptune's own training loop and
    stores every epoch's validation and test metrics (accuracy, certified accuracy at several
    eps, mean certified radius) and the trained model's test radii summary as JSON lines under
    ``benchmarks/data/``. Resumable: configurations already in the file are skipped.
``replay``
    runs every method (the grid of the guidelines' ladders, random, TPE, auto, auto + mo-asha,
    guided with and without pruning, Syne Tune's MOASHA) against that table for many seeds, with
    the same epoch budget, and reports hypervolume of (test accuracy, test certified accuracy at
    the study's eps) against cumulative epochs (PNG + a markdown table).

Tasks: ``digits`` (the README's MLP 64-64, 10 epochs per trial, eps 0.3) and ``fashion``
(Fashion-MNIST, the reference convnet, 9 epochs per trial, a fixed 10,000-image training subset,
the full test set, eps 0.5), each over 8 temperatures and 7 margins x 5 alphas (43
configurations) plus the guideline settings cosine and hinge, trained with several seeds.
``fashion-inv`` (issue 23): the same convnet with invertible pooling, offset_ce's 3 offsets x 3
temperatures, the 8 temperatures and HKR's 4 margins x 2 alphas; ``fashion-offset``: offset_ce's
9 settings trained into the l2 ``fashion`` table (``build --families offset_ce``).
``guidelines`` replays the default study (12 trials of 5 epochs) against the guidelines'
hand-picked settings; ``guidelines-live`` runs it for real over ranges; ``live`` confirms the
replay with real studies.

    nice -n 10 .venv/bin/python benchmarks/study_efficiency.py build --task digits
    PYTHONPATH=. /tmp/st/bin/python benchmarks/study_efficiency.py replay --task digits \
        --seeds 20 --budget 1.5

(``/tmp/st``: a virtual environment that sees ``.venv`` and has Syne Tune, see
benchmarks/README.md; without Syne Tune pass ``--methods`` without the two MOASHA entries.)
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from worker.common._paths import default_data_roots, liptune_home
from worker.search._pruning import MOASHA
from worker.search._samplers import LADDER_POINTS, build_sampler, guideline_points
from worker.search._space import suggest_params
from worker.spec import StudySpec
from worker.trial._evaluation import accuracy_metrics, predict
from worker.trial._losses import build_loss
from worker.trial._models import build_model
from worker.trial._training import resolve_device, train
from worker.trial.datasets import load_dataset

DATA = Path(__file__).parent / "data"
REPORT_EPS = (0.1, 0.3, 0.5, 1.0)

#: The guidelines' one-dimensional trade-off curves (inputs in [0, 1]: margins 0.01 to 5).
TEMPERATURES = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
MARGINS = (0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0)
ALPHAS = (1.0, 10.0, 100.0, 1000.0, math.inf)
MIDDLE_MARGIN = 0.5


@dataclass(frozen=True)
class Task:
    name: str
    study: dict[str, Any]
    alphas: tuple[float, ...] = ALPHAS
    margins: tuple[float, ...] = MARGINS
    #: The table's file name when it is another task's (a sub-space of its configurations).
    table: str | None = None
    #: offset_ce's offsets x temperatures (issue 23), trained first; empty: not in the task.
    offsets: tuple[float, ...] = ()
    offset_temperatures: tuple[float, ...] = ()
    #: Whether the guidelines' hand-picked settings are part of the table.
    guidelines: bool = True

    @property
    def spec(self) -> StudySpec:
        return StudySpec.model_validate(self.study)

    @property
    def epochs(self) -> int:
        return self.spec.training.epochs

    @property
    def eps(self) -> float:
        return self.spec.objectives[1].eps

    @property
    def table_path(self) -> Path:
        return DATA / f"{self.table or self.name}.jsonl.gz"


def search_space(alphas: tuple[float, ...], margins: tuple[float, ...] = MARGINS) -> dict[str, Any]:
    """tau_ce's temperatures and, when ``alphas`` is not empty, HKR's margins x alphas."""
    if not alphas:
        return {"loss": ["tau_ce"], "temperature": list(TEMPERATURES)}
    return {
        "loss": ["hkr", "tau_ce"],
        "margin": list(margins),
        "alpha_kr": list(alphas),
        "temperature": list(TEMPERATURES),
    }


#: Fashion-MNIST's table: the same dense set as digits, 8 temperatures and 7 margins x 5 alphas
#: (one configuration, 9 epochs with validation and the 10,000 test images scored every epoch,
#: takes about 35 s on one idle core, 1.5 to 7 minutes under the load of six sessions).
#: Margins in build order, the middle ones first, so that a partial table is still spread.
FASHION_ALPHAS = ALPHAS
FASHION_MARGINS = (0.5, 2.0, 0.05, 0.2, 1.0, 0.01, 5.0)
#: The guidelines' hand-picked settings a study must beat (issue: "cosine, hinge (margin 0.5),
#: HKR (alpha_kr 100, margin 0.5), tau-CE 3 and tau-CE 100"), trained into the table too.
GUIDELINE_SETTINGS = (
    {"loss": "cosine"},
    {"loss": "hinge", "margin": 0.5},
    {"loss": "hkr", "margin": 0.5, "alpha_kr": 100.0},
    {"loss": "tau_ce", "temperature": 3.0},
    {"loss": "tau_ce", "temperature": 100.0},
)
FASHION_MODEL = {
    "name": "convnet",
    "channels": [16, 32],
    "convs_per_stage": 1,
    "kernel_size": 3,
    "pooling": "l2",
    "dense_widths": [64],
}
#: The same convnet with the zoo's default pooling (space-to-depth), issue 23's measurement.
FASHION_INVERTIBLE_MODEL = {**FASHION_MODEL, "pooling": "invertible"}
#: offset_ce (issue 23): offsets around 0.35, the logit gap that certifies eps 0.25 for a global
#: head (sqrt(2) * 0.25), x liptune's temperatures (the papers' T = 1 / tau); build order.
OFFSETS = (0.35, 0.2, 0.7)
OFFSET_TEMPERATURES = (8.0, 2.0, 32.0)
#: The invertible-pooling table's HKR subset (a slice of the l2 table's 35, build order).
INVERTIBLE_ALPHAS = (100.0, math.inf)
INVERTIBLE_MARGINS = (0.5, 2.0, 0.2, 1.0)


def offset_space(space: dict[str, Any], offsets: tuple[float, ...], temperatures) -> dict:
    """``space`` with offset_ce added: its offsets join the margins, its temperatures the
    temperatures (a discrete table: the replay snaps a configuration to a trained one)."""
    return {
        **space,
        "loss": [*space["loss"], "offset_ce"],
        "margin": sorted({*space.get("margin", []), *offsets}),
        "temperature": sorted({*space["temperature"], *temperatures}),
    }


def _fashion(
    alphas: tuple[float, ...],
    margins: tuple[float, ...] = FASHION_MARGINS,
    model: dict[str, Any] = FASHION_MODEL,
    offsets: tuple[float, ...] = (),
) -> dict[str, Any]:
    space = search_space(alphas, tuple(sorted(margins)))
    if offsets:
        space = offset_space(space, offsets, OFFSET_TEMPERATURES)
    return {
        "name": "efficiency-fashion",
        "dataset": {"name": "fashion-mnist", "n_samples": 10_000},
        "model": model,
        "training": {"epochs": 9, "batch_size": 128, "lr": 0.001, "device": "cpu"},
        "search_space": space,
        "objectives": [{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.5}],
        "eps": list(REPORT_EPS),
    }


TASKS = {
    "digits": Task(
        "digits",
        {
            "name": "efficiency-digits",
            "dataset": {"name": "digits"},
            "model": {"name": "mlp", "widths": [64, 64]},
            "training": {"epochs": 10, "batch_size": 128, "lr": 0.005, "device": "cpu"},
            "search_space": search_space(ALPHAS),
            "objectives": [{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.3}],
            "eps": list(REPORT_EPS),
        },
    ),
    "fashion": Task("fashion", _fashion(FASHION_ALPHAS), FASHION_ALPHAS, FASHION_MARGINS),
    # the temperature ladder alone (the first 8 configurations of the fashion table)
    "fashion-tau": Task("fashion-tau", _fashion(()), (), (), table="fashion"),
    # the user study: 5 epochs per trial (the table's first 5 epochs: constant lr)
    "fashion-5": Task(
        "fashion-5",
        {**_fashion(FASHION_ALPHAS), "training": {**_fashion(())["training"], "epochs": 5}},
        FASHION_ALPHAS,
        FASHION_MARGINS,
        table="fashion",
    ),
    # issue 23: offset_ce on the l2 table (trained into it with `build --families offset_ce`)
    "fashion-offset": Task(
        "fashion-offset",
        _fashion(FASHION_ALPHAS, offsets=OFFSETS),
        FASHION_ALPHAS,
        FASHION_MARGINS,
        table="fashion",
        offsets=OFFSETS,
        offset_temperatures=OFFSET_TEMPERATURES,
    ),
    # issue 23: the three families with invertible pooling (HKR: 4 margins x 2 alphas)
    "fashion-inv": Task(
        "fashion-inv",
        _fashion(INVERTIBLE_ALPHAS, INVERTIBLE_MARGINS, FASHION_INVERTIBLE_MODEL, offsets=OFFSETS),
        INVERTIBLE_ALPHAS,
        INVERTIBLE_MARGINS,
        offsets=OFFSETS,
        offset_temperatures=OFFSET_TEMPERATURES,
        guidelines=False,
    ),
    # the same table without offset_ce: what a study over hkr and tau_ce alone finds
    "fashion-inv-2": Task(
        "fashion-inv-2",
        _fashion(INVERTIBLE_ALPHAS, INVERTIBLE_MARGINS, FASHION_INVERTIBLE_MODEL),
        INVERTIBLE_ALPHAS,
        INVERTIBLE_MARGINS,
        table="fashion-inv",
        guidelines=False,
    ),
}


def offset_configs(task: Task) -> list[dict[str, Any]]:
    """offset_ce's offsets x temperatures (none when the task has no offsets)."""
    return [
        {"loss": "offset_ce", "margin": m, "temperature": t}
        for m in task.offsets
        for t in task.offset_temperatures
    ]


def dense_configs(task: Task) -> list[dict[str, Any]]:
    """Every configuration of the discretised space: each temperature, each (margin, alpha),
    each (offset, temperature) of offset_ce."""
    configs: list[dict[str, Any]] = offset_configs(task)
    configs += [{"loss": "tau_ce", "temperature": t} for t in TEMPERATURES]
    configs += [
        {"loss": "hkr", "margin": m, "alpha_kr": a}
        for a in reversed(task.alphas)
        for m in task.margins
    ]
    return configs


def build_configs(task: Task, families: list[str] | None = None) -> list[dict[str, Any]]:
    """What ``build`` trains: offset_ce's settings and the guideline settings first, then the
    dense configurations; only those of ``families`` when given."""
    guidelines = GUIDELINE_SETTINGS if task.guidelines else ()
    configs = {config_key(c): c for c in (*offset_configs(task), *guidelines, *dense_configs(task))}
    chosen = [c for c in configs.values() if families is None or c["loss"] in families]
    if task.offsets:  # fashion-inv: the likely front first, so that a partial table is useful
        chosen.sort(key=_build_priority)
    return chosen


#: fashion-inv's build order: offset_ce, then the temperatures from the knee outwards, then
#: HKR margin by margin (both alphas), the front's margins first.
TEMPERATURE_BUILD_ORDER = (1.0, 3.0, 10.0, 0.3, 30.0, 100.0, 0.1, 0.03)


def _build_priority(config: dict[str, Any]) -> tuple[int, int, int]:
    if config["loss"] == "tau_ce":
        return (1, TEMPERATURE_BUILD_ORDER.index(config["temperature"]), 0)
    if config["loss"] == "hkr":
        return (
            2,
            (2.0, 1.0, 0.5, 0.2).index(config["margin"]),
            not math.isfinite(config["alpha_kr"]),
        )
    return (0, 0, 0)


def grid_configs(task: Task) -> list[dict[str, Any]]:
    """The manual loop of the guidelines: the temperature ladder, the margin ladder at
    alpha_kr = inf (hinge only), the alpha_kr ladder at the middle margin; and offset_ce's
    offsets x temperatures when the task has them."""
    configs: list[dict[str, Any]] = [{"loss": "tau_ce", "temperature": t} for t in TEMPERATURES]
    if not task.alphas:
        return configs
    configs += [{"loss": "hkr", "margin": m, "alpha_kr": math.inf} for m in task.margins]
    configs += [
        {"loss": "hkr", "margin": MIDDLE_MARGIN, "alpha_kr": a}
        for a in task.alphas
        if math.isfinite(a)
    ]
    return configs + offset_configs(task)  # offset_ce: its whole offsets x temperatures table


def config_key(config: dict[str, Any]) -> str:
    """A canonical name of a configuration, e.g. ``hkr|alpha_kr=inf|margin=0.5``."""
    parts = [f"{name}={config[name]:g}" for name in sorted(config) if name != "loss"]
    return "|".join([config["loss"], *parts])


# --------------------------------------------------------------------------- build


def _epoch_row(model, splits, mode: str, record: dict, tested: list) -> dict[str, Any]:
    """One epoch's metrics; its test predictions are put in ``tested`` (the last epoch's make
    the entry's radii summary)."""
    val = predict(model, splits.val.x, splits.val.y, mode)
    test = predict(model, splits.test.x, splits.test.y, mode)
    tested[:] = [test]
    row = {"epoch": int(record["epoch"]), "seconds": record["seconds"]}
    row["train_loss"] = record["train_loss"]
    for prefix, predictions in (("val_", val), ("test_", test)):
        row.update(accuracy_metrics(predictions, REPORT_EPS, prefix=prefix))
        correct = predictions.correct
        radius = predictions.radii[correct].double().mean().item() if correct.any() else 0.0
        row[f"{prefix}mean_certified_radius"] = radius
    return row


def build(task: Task, threads: int, seed: int, families: list[str] | None = None) -> None:
    """Train every configuration of :func:`build_configs` (of ``families`` when given) once with
    training seed ``seed`` (data split, initialisation, batch order), appending to the table."""
    torch.set_num_threads(threads)
    task.table_path.parent.mkdir(parents=True, exist_ok=True)
    done = (
        {(row["key"], row.get("seed", 0)) for row in read_table(task)}
        if task.table_path.exists()
        else set()
    )
    study = task.spec
    started = time.perf_counter()
    for config in build_configs(task, families):
        key = config_key(config)
        if (key, seed) in done:
            continue
        spec = study.trial_spec(config, seed=seed)
        splits = load_dataset(
            spec.dataset, data_roots=default_data_roots(liptune_home()), seed=spec.seed
        )
        torch.manual_seed(spec.seed)
        model = build_model(spec.model, splits.input_shape, splits.num_classes)
        device = resolve_device(spec.training.device)
        model.to(device)
        loss_fn = build_loss(spec.loss, splits.task)
        rows: list[dict[str, Any]] = []
        tested: list = []
        tick = time.perf_counter()

        def on_epoch(record: dict, model=model, splits=splits, rows=rows, tested=tested) -> None:
            rows.append(_epoch_row(model, splits, model.certificate_mode, record, tested))

        run = train(
            model,
            loss_fn,
            splits,
            spec.training,
            eps=spec.eps,
            mode=model.certificate_mode,
            device=device,
            seed=spec.seed,
            on_epoch=on_epoch,
        )
        entry = {
            "key": key,
            "seed": seed,
            "config": config,
            "failure_reason": run.failure_reason,
            "wall_seconds": time.perf_counter() - tick,
            "epochs": rows,
            # the trained model's radii only: one summary per epoch made the tables 9x larger
            "test_radii": tested[0].summary().encode() if tested else None,
        }
        # a new gzip member per configuration; locked: builds of two seeds may share a table
        with open(task.table_path, "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with gzip.open(task.table_path, "at") as file:
                file.write(json.dumps(entry) + "\n")
        last = rows[-1] if rows else {}
        print(
            f"{key:40s} seed {seed} {entry['wall_seconds']:7.1f} s  "
            f"acc {last.get('test_accuracy', float('nan')):.3f}  "
            f"cert@{task.eps:g} {last.get(f'test_certified_accuracy_eps_{task.eps:g}', 0):.3f}",
            flush=True,
        )
    print(f"built {task.table_path} in {time.perf_counter() - started:.0f} s", flush=True)


def read_table(task: Task) -> list[dict[str, Any]]:
    with gzip.open(task.table_path, "rt") as file:
        return [json.loads(line) for line in file if line.strip()]


# --------------------------------------------------------------------------- replay

#: Hypervolume reference point of (accuracy, certified accuracy): chance accuracy on ten
#: classes, no certificate; common to every method and seed of a task.
REFERENCE_POINT = (0.1, 0.0)
GRID_METHOD = "grid"


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Area dominated by ``points`` (both coordinates maximised) above :data:`REFERENCE_POINT`."""
    rx, ry = REFERENCE_POINT
    kept = sorted({(x, y) for x, y in points if x > rx and y > ry}, reverse=True)
    area, best_y = 0.0, ry
    for x, y in kept:  # decreasing accuracy: each point adds the strip above the best so far
        if y > best_y:
            area += (x - rx) * (y - best_y)
            best_y = y
    return area


@dataclass
class Trace:
    """One replayed study: the hypervolume after each trial, against cumulative epochs, and the
    test points (accuracy, certified accuracy) of its completed trials."""

    epochs: list[int] = field(default_factory=list)
    hypervolume: list[float] = field(default_factory=list)
    points: list[tuple[float, float]] = field(default_factory=list)
    trials: int = 0
    pruned: int = 0

    def at(self, epoch: int) -> float:
        """The hypervolume once ``epoch`` epochs were spent."""
        index = np.searchsorted(self.epochs, epoch, side="right") - 1
        return self.hypervolume[index] if index >= 0 else 0.0

    def epochs_to(self, target: float) -> int | None:
        pairs = zip(self.epochs, self.hypervolume, strict=True)
        return next((e for e, h in pairs if h >= target), None)


class Replay:
    """A task's table as the trial function of a replayed study. A configuration trained with
    several seeds answers each trial with one of them, drawn by the study's seed: training noise
    is part of what a method meets (a live trial trains with the study's seed + its number)."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.spec = task.spec
        self.snapped = 0  # trials answered by a nearest trained configuration (:meth:`snap`)
        guidelines = GUIDELINE_SETTINGS if task.guidelines else ()
        wanted = {config_key(config) for config in (*dense_configs(task), *guidelines)}
        self.entries: dict[str, list[dict[str, Any]]] = {}
        for row in read_table(task):
            if row["key"] in wanted:
                self.entries.setdefault(row["key"], []).append(row)
        for rows in self.entries.values():
            rows.sort(key=lambda row: row.get("seed", 0))
        missing = sorted(wanted - set(self.entries))
        if missing:
            raise SystemExit(f"{task.table_path} lacks {missing}: run `build --task {task.name}`")
        eps = f"{task.eps:g}"
        self.test_keys = ("test_accuracy", f"test_certified_accuracy_eps_{eps}")

    def snap(self, config: dict[str, Any]) -> str:
        """The key of ``config``'s training, or, in a space whose families share parameter
        lists (``fashion-inv``: offset_ce's offsets are margins, HKR's margins offsets), of
        the nearest trained configuration of its family (in log scale): a re-suggested or
        snapped setting gets another draw of a trained one, as a discrete table does."""
        key = config_key(config)
        if key in self.entries:
            return key

        def distance(other: str) -> float:
            values = dict(part.split("=") for part in other.split("|")[1:])
            return sum(
                abs(math.log(min(float(values[name]), 1e9)) - math.log(min(float(v), 1e9)))
                for name, v in config.items()
                if name in values
            )

        family = [k for k in self.entries if k.split("|")[0] == config["loss"]]
        if not family:
            raise KeyError(key)
        nearest = min(family, key=distance)
        self.snapped += 1
        return nearest

    def epochs_of(self, config: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
        """One training of ``config`` (a seed drawn with ``rng``), its first ``task.epochs``
        epochs: the table's constant learning rate makes them a shorter trial's epochs."""
        runs = self.entries[self.snap(config)]
        return runs[int(rng.integers(len(runs)))]["epochs"][: self.task.epochs]

    def trainings(self) -> list[list[dict[str, Any]]]:
        """Every complete training of the search space's configurations (all seeds)."""
        wanted = {config_key(config) for config in dense_configs(self.task)}
        return [
            run["epochs"][: self.task.epochs]
            for key, runs in self.entries.items()
            if key in wanted
            for run in runs
            if len(run["epochs"]) >= self.task.epochs
        ]

    def final(self, rows: list[dict[str, Any]]) -> tuple[float, float]:
        return tuple(float(rows[-1][k]) for k in self.test_keys)  # type: ignore[return-value]

    def run(
        self,
        next_config: Callable[[], tuple[dict[str, Any], Any]] | None,
        budget: int,
        seed: int,
        *,
        pruner: MOASHA | None = None,
        report: Callable[[Any, str, list[dict[str, Any]]], None] | None = None,
        configs: list[dict[str, Any]] | None = None,
    ) -> Trace:
        """Run trials until ``budget`` epochs are spent: ``next_config()`` gives a trial's
        configuration and a handle, ``report(handle, state, rows)`` tells the outcome
        (``"complete"``, ``"pruned"``, ``"fail"``); ``configs`` replaces ``next_config`` with a
        fixed list (the grid). A trial that ``pruner`` stops at a rung ends there; its epochs
        count; ``seed`` draws which training of a configuration each trial gets."""
        rng = np.random.default_rng([seed, 1])
        trace, spent = Trace(), 0
        history: list[tuple[int, list[dict[str, Any]]]] = []
        number = 0
        while spent < budget:
            if configs is not None:
                if number >= len(configs):
                    break
                config, handle = configs[number], None
            else:
                config, handle = next_config()
            rows = self.epochs_of(config, rng)
            done: list[dict[str, Any]] = []
            state = "complete"
            for row in rows:
                if spent >= budget:
                    state = "cut"
                    break
                done.append(row)
                spent += 1
                if pruner is not None and pruner.decide(number, done, history):
                    state = "pruned"
                    break
            if state == "complete" and len(rows) < self.task.epochs:
                state = "fail"  # the loss diverged in the dense run
            history.append((number, done))
            number += 1
            trace.trials += 1
            if state == "complete":
                trace.points.append(self.final(rows))
            trace.pruned += state == "pruned"
            if report is not None and state != "cut":
                report(handle, state, done)
            trace.epochs.append(spent)
            trace.hypervolume.append(hypervolume(trace.points))
        return trace


def optuna_method(
    sampler: str, pruner: bool, anchored: bool = True
) -> Callable[[Replay, int, int], Trace]:
    """A liptune study: the real sampler and pruner of the spec, over the table. ``anchored =
    False`` (``guided`` only, an ablation) starts the ladders at their middles instead of at the
    objective's eps (:func:`worker.search._samplers.eps_anchors`)."""

    def method(replay: Replay, seed: int, budget: int) -> Trace:
        update: dict[str, Any] = {"sampler": sampler, "seed": seed}
        if pruner:
            update["pruner"] = {"name": "mo-asha", "min_epochs": 1, "reduction_factor": 3}
        spec = StudySpec.model_validate({**replay.task.study, **update})
        study_sampler = build_sampler(spec, seed)
        if not anchored:
            study_sampler.points = guideline_points(spec.search_space, LADDER_POINTS)
        study = optuna.create_study(
            directions=[o.direction for o in spec.objectives], sampler=study_sampler
        )
        space = spec.search_space

        def next_config() -> tuple[dict[str, Any], Any]:
            trial = study.ask()
            return suggest_params(trial, space), trial

        def report(trial: Any, state: str, rows: list[dict[str, Any]]) -> None:
            if state == "complete":
                study.tell(trial, list(replay.final(rows)))
            else:
                study.tell(trial, state=getattr(optuna.trial.TrialState, state.upper()))

        return replay.run(
            next_config, budget, seed, pruner=MOASHA(spec) if pruner else None, report=report
        )

    return method


def grid_method(replay: Replay, seed: int, budget: int) -> Trace:
    """The guideline ladders, each setting trained in full, in a seeded order."""
    configs = grid_configs(replay.task)
    order = np.random.default_rng(seed).permutation(len(configs))
    return replay.run(None, budget, seed, configs=[configs[i] for i in order])


def syne_tune_moasha(fixed_ranks: bool) -> Callable[[Replay, int, int], Trace]:
    """Syne Tune's MOASHA scheduler (random configurations, its own stopping rule at rungs
    1, 3, 9, ...) deciding on the same validation metrics of the table.

    Syne Tune 0.16's ``NonDominatedPriority`` returns ``nondominated_sort``'s ORDER (indices,
    best first) where ASHA's ``Bracket.on_result`` expects one priority PER TRIAL, so the rank
    it computes for the new trial is the position of whichever trial sorts last: nearly every
    trial stops at its first rung. ``fixed_ranks`` turns the order into per-trial ranks
    (the scheduler as its paper describes it); both are reported."""

    def method(replay: Replay, seed: int, budget: int) -> Trace:
        return _syne_tune_moasha(replay, seed, budget, fixed_ranks)

    return method


def _syne_tune_moasha(replay: Replay, seed: int, budget: int, fixed_ranks: bool) -> Trace:
    try:
        from syne_tune.backend.trial_status import Trial
        from syne_tune.config_space import choice
        from syne_tune.optimizer.scheduler import SchedulerDecision
        from syne_tune.optimizer.schedulers.multiobjective.moasha import MOASHA as SyneMOASHA
        from syne_tune.optimizer.schedulers.multiobjective.multiobjective_priority import (
            NonDominatedPriority,
        )
    except ImportError as error:
        raise SystemExit(
            "Syne Tune is not installed: `pip install syne-tune` (the `bench` extra)"
        ) from error
    from datetime import datetime

    class RankedPriority(NonDominatedPriority):
        def priority_unsafe(self, objectives: np.ndarray) -> np.ndarray:
            order = super().priority_unsafe(objectives)
            ranks = np.empty(len(order))
            ranks[order] = np.arange(len(order))
            return ranks

    np.random.seed(seed)
    eps = f"{replay.task.eps:g}"
    metrics = ["val_accuracy", f"val_certified_accuracy_eps_{eps}"]
    space = {"loss": choice(["tau_ce"]), "temperature": choice(list(TEMPERATURES))}
    if replay.task.alphas:
        space["loss"] = choice(["hkr", "tau_ce"])
        space["margin"] = choice(list(replay.task.margins))
        space["alpha_kr"] = choice(list(replay.task.alphas))
    scheduler = SyneMOASHA(
        space,
        metrics=metrics,
        do_minimize=False,
        time_attr="epoch",
        max_t=replay.task.epochs,
        grace_period=1,
        reduction_factor=3,
        random_seed=seed,
        multiobjective_priority=RankedPriority() if fixed_ranks else None,
    )
    trace, spent, number = Trace(), 0, 0
    rng = np.random.default_rng([seed, 1])
    while spent < budget:
        sampled = scheduler.suggest().config
        config = (
            {"loss": "tau_ce", "temperature": sampled["temperature"]}
            if sampled["loss"] == "tau_ce"
            else {"loss": "hkr", "margin": sampled["margin"], "alpha_kr": sampled["alpha_kr"]}
        )
        trial = Trial(trial_id=number, config=sampled, creation_time=datetime.now())
        scheduler.on_trial_add(trial)
        rows = replay.epochs_of(config, rng)
        state = "complete"
        for row in rows:
            if spent >= budget:
                state = "cut"
                break
            spent += 1
            result = {"epoch": row["epoch"], **{m: row[m] for m in metrics}}
            if row["epoch"] == replay.task.epochs:
                scheduler.on_trial_complete(trial, result)
            elif scheduler.on_trial_result(trial, result) == SchedulerDecision.STOP:
                scheduler.on_trial_remove(trial)
                state = "pruned"
                break
        if state == "complete" and len(rows) < replay.task.epochs:
            state = "fail"
        number += 1
        trace.trials += 1
        trace.pruned += state == "pruned"
        if state == "complete":
            trace.points.append(replay.final(rows))
        trace.epochs.append(spent)
        trace.hypervolume.append(hypervolume(trace.points))
    return trace


METHODS: dict[str, Callable[[Replay, int, int], Trace]] = {
    GRID_METHOD: grid_method,
    "random": optuna_method("random", pruner=False),
    "tpe": optuna_method("tpe", pruner=False),
    "auto": optuna_method("auto", pruner=False),
    "auto + mo-asha": optuna_method("auto", pruner=True),
    "guided": optuna_method("guided", pruner=False),
    "guided + mo-asha": optuna_method("guided", pruner=True),
    "guided, ladders from the middle": optuna_method("guided", pruner=False, anchored=False),
    "random + mo-asha": optuna_method("random", pruner=True),
    "syne-tune MOASHA": syne_tune_moasha(fixed_ranks=False),
    "syne-tune MOASHA, ranks fixed": syne_tune_moasha(fixed_ranks=True),
}


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return float(q1), float(q2), float(q3)


def at_eps(task: Task, eps: float) -> Task:
    """``task`` with its certified-accuracy objective at ``eps`` (one the table reports), on the
    same table: a held-out check of what was chosen at the task's own eps."""
    if eps not in REPORT_EPS:
        raise SystemExit(f"--eps: the tables report {REPORT_EPS}, not {eps:g}")
    objectives = [
        {**objective, "eps": eps} if objective.get("eps") is not None else objective
        for objective in task.study["objectives"]
    ]
    study = {**task.study, "objectives": objectives}
    return replace(task, name=f"{task.name}-eps{eps:g}", study=study, table=task.table or task.name)


def replay(
    task: Task, seeds: int, budget_factor: float, methods: list[str], write: bool = True
) -> dict[str, Any]:
    """Every method on ``task``'s table for ``seeds`` seeds; the budget is ``budget_factor``
    times the grid's epochs. Returns the traces' summary (with ``write``, also written as JSON
    and plotted)."""
    table = Replay(task)
    grid_epochs = len(grid_configs(task)) * task.epochs
    budget = int(budget_factor * grid_epochs)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    traces: dict[str, list[Trace]] = {}
    started = time.perf_counter()
    for name in methods:
        traces[name] = [METHODS[name](table, seed, budget) for seed in range(seeds)]
        print(f"{task.name}: {name} done ({time.perf_counter() - started:.0f} s)", flush=True)
    dense = [table.final(rows) for rows in table.trainings()]
    best_found = max(t.hypervolume[-1] for runs in traces.values() for t in runs)
    target = 0.95 * best_found
    grid_runs = [t.epochs_to(target) for t in traces[GRID_METHOD]] if GRID_METHOD in traces else []
    grid_reached = [e for e in grid_runs if e is not None]
    grid_median = statistics.median(grid_reached) if grid_reached else grid_epochs
    summary: dict[str, Any] = {
        "task": task.name,
        "seeds": seeds,
        "budget_epochs": budget,
        "grid_epochs": grid_epochs,
        "reference_point": REFERENCE_POINT,
        "dense_table_hypervolume": hypervolume(dense),
        "best_found_hypervolume": best_found,
        "grid_reaches_target": f"{len(grid_reached)}/{len(grid_runs)}",
        "grid_median_epochs_to_target": grid_median,
        "snapped_trials": table.snapped,
        "methods": {},
    }
    for name, runs in traces.items():
        reached = [t.epochs_to(target) for t in runs]
        # a seed that never reaches the target counts as the whole budget (a lower bound)
        as_epochs = [budget if e is None else e for e in reached]
        q1, q2, q3 = _quartiles([e / grid_median for e in as_epochs])
        summary["methods"][name] = {
            "reached": sum(e is not None for e in reached),
            "median_epochs": statistics.median(as_epochs),
            "ratio_to_grid_median": q2,
            "ratio_q1": q1,
            "ratio_q3": q3,
            "final_hv_median": statistics.median(t.hypervolume[-1] for t in runs),
            "hv_at_grid_epochs_median": statistics.median(t.at(grid_epochs) for t in runs),
            "trials_median": statistics.median(t.trials for t in runs),
            "pruned_median": statistics.median(t.pruned for t in runs),
        }
    out = DATA / f"{task.name}_replay.json"
    traces_json = {
        name: [{"epochs": t.epochs, "hypervolume": t.hypervolume} for t in runs]
        for name, runs in traces.items()
    }
    if write:
        out.write_text(json.dumps({**summary, "traces": traces_json}))
        _plot(task, traces, budget, target, summary)
    return summary


def _plot(
    task: Task, traces: dict[str, list[Trace]], budget: int, target: float, summary: dict
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.arange(0, budget + 1)
    figure, axis = plt.subplots(figsize=(8, 5))
    for name, runs in traces.items():
        curves = np.array([[t.at(e) for e in grid] for t in runs])
        q1, q2, q3 = np.percentile(curves, [25, 50, 75], axis=0)
        (line,) = axis.plot(grid, q2, label=name, lw=2.2 if name == GRID_METHOD else 1.4)
        axis.fill_between(grid, q1, q3, color=line.get_color(), alpha=0.12)
    axis.axhline(target, color="k", ls=":", lw=1, label="95 % of the best found")
    axis.axvline(summary["grid_epochs"], color="grey", ls="--", lw=0.8)
    axis.set_xlabel("cumulative training epochs")
    axis.set_ylabel(
        f"hypervolume (accuracy, certified accuracy @ {task.eps:g}), ref {REFERENCE_POINT}"
    )
    axis.set_title(f"{task.name}: median and quartiles over {summary['seeds']} seeds")
    best = summary["best_found_hypervolume"]
    axis.set_ylim(0.8 * best, 1.02 * best)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(Path(__file__).parent / f"study_efficiency_{task.name}.png", dpi=110)
    plt.close(figure)


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"**{summary['task']}** ({summary['seeds']} seeds, budget {summary['budget_epochs']} "
        f"epochs, grid {summary['grid_epochs']} epochs; reference point "
        f"{tuple(summary['reference_point'])}; best hypervolume found "
        f"{summary['best_found_hypervolume']:.4f}, dense table's front "
        f"{summary['dense_table_hypervolume']:.4f}; the grid reaches 95 % in "
        f"{summary['grid_reaches_target']} seeds, median {summary['grid_median_epochs_to_target']}"
        " epochs)",
        "",
        "| method | seeds reaching 95 % | epochs to 95 % (median) | ratio to grid: median "
        "[q1, q3] | HV at the grid's epochs | final HV | trials | pruned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["methods"].items():
        lines.append(
            f"| {name} | {row['reached']}/{summary['seeds']} | {row['median_epochs']:.0f} | "
            f"{row['ratio_to_grid_median']:.2f} [{row['ratio_q1']:.2f}, {row['ratio_q3']:.2f}] | "
            f"{row['hv_at_grid_epochs_median']:.4f} | {row['final_hv_median']:.4f} | "
            f"{row['trials_median']:.0f} | {row['pruned_median']:.0f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- guideline settings


def _covers(front: list[tuple[float, float]], point: tuple[float, float]) -> bool:
    """Whether some point of ``front`` is at least ``point`` in both objectives."""
    return any(x >= point[0] and y >= point[1] for x, y in front)


def guidelines(task: Task, seeds: int, n_trials: int, families: list[str]) -> dict[str, Any]:
    """The study a user gets with the defaults (``StudySpec``'s sampler and pruner) over the loss
    ``families``, ``n_trials`` trials' worth of epochs, against each of
    :data:`GUIDELINE_SETTINGS` trained once for the same epochs per trial; both draw their
    trainings from the table with each seed. Returns, per setting, in how many seeds the study's
    front covers it (a completed trial at least as good in accuracy and certified accuracy) and,
    as the noise floor, in how many seeds another training of that very setting covers it; and
    the hypervolumes."""
    space = {**task.study["search_space"], "loss": families}
    study = {**task.study, "search_space": space}
    table = Replay(Task(task.name, study, task.alphas, task.margins, task.table))
    defaults = StudySpec.model_validate(study)
    sampler, pruned = defaults.sampler, defaults.pruner.name != "none"
    budget = n_trials * task.epochs
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    covered = {config_key(setting): 0 for setting in GUIDELINE_SETTINGS}
    retrained = dict(covered)
    study_hv, settings_hv = [], []
    for seed in range(seeds):
        trace = optuna_method(sampler, pruned)(table, seed, budget)
        rng = np.random.default_rng([seed, 2])
        points = [table.final(table.epochs_of(s, rng)) for s in GUIDELINE_SETTINGS]
        for setting, point in zip(GUIDELINE_SETTINGS, points, strict=True):
            covered[config_key(setting)] += _covers(trace.points, point)
            again = table.final(table.epochs_of(setting, rng))
            retrained[config_key(setting)] += _covers([again], point)
        study_hv.append(hypervolume(trace.points))
        settings_hv.append(hypervolume(points))
    return {
        "task": task.name,
        "seeds": seeds,
        "study": f"sampler {sampler}, pruner {defaults.pruner.name}, {n_trials} x "
        f"{task.epochs} epochs",
        "covered": covered,
        "covered_by_a_retraining": retrained,
        "study_hv_median": statistics.median(study_hv),
        "settings_hv_median": statistics.median(settings_hv),
        "study_hv_above_settings": sum(a > b for a, b in zip(study_hv, settings_hv, strict=True)),
    }


# --------------------------------------------------------------------------- live confirmation


LIVE_METHODS = (GRID_METHOD, "guided", "guided + mo-asha")


def _live_update(task: Task, method: str, n_trials: int, seed: int) -> dict[str, Any]:
    update: dict[str, Any] = {"seed": seed, "n_trials": n_trials}
    if method == GRID_METHOD:
        ladder = grid_configs(task)
        update.update(sampler="random", baselines=ladder, n_trials=len(ladder))
    elif method in LIVE_METHODS:
        update["sampler"] = "guided"
        if method == "guided + mo-asha":
            update["pruner"] = {"name": "mo-asha"}
    else:
        raise SystemExit(f"live runs: one of {LIVE_METHODS}, not {method!r}")
    return update


def live(task: Task, method: str, n_trials: int, seed: int) -> dict[str, Any]:
    """One real study on a fresh SQLite storage, run by one real worker (no MLflow): ``grid``
    enqueues the guideline ladders as baselines (the manual loop), ``guided`` (the default) and
    ``guided + mo-asha`` are the specs a user submits. Returns the hypervolume after each
    finished trial against the epochs the study had trained by then (from the trials' records)."""
    spec = StudySpec.model_validate({**task.study, **_live_update(task, method, n_trials, seed)})
    return {"method": method, **_run_live(spec)}


def _run_live(spec: StudySpec) -> dict[str, Any]:
    import tempfile
    import uuid

    from service.migrations import upgrade
    from worker.loop import Worker, WorkerOptions
    from worker.study._record import TrialAttributes
    from worker.study._studies import create_study, optuna_study_name

    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/live.db"
        upgrade(url)
        study_id = uuid.uuid4().hex
        create_study(url, spec, study_id)
        worker = Worker(WorkerOptions(storage_url=url, threads=1, device="cpu", worker_id="live"))
        started = time.perf_counter()
        while worker.run_next():
            pass
        wall = time.perf_counter() - started
        study = optuna.load_study(study_name=optuna_study_name(study_id), storage=url)
        finished = sorted(study.trials, key=lambda t: t.datetime_complete)
    spent, trace = 0, Trace()
    for trial in finished:
        record = TrialAttributes.read(trial)
        spent += len(record.epochs)
        trace.trials += 1
        if trial.state == optuna.trial.TrialState.COMPLETE:
            trace.points.append(tuple(trial.values))
        trace.pruned += trial.state == optuna.trial.TrialState.PRUNED
        trace.epochs.append(spent)
        trace.hypervolume.append(hypervolume(trace.points))
    by_number = sorted(finished, key=lambda t: t.number)
    values = [
        tuple(t.values) if t.state == optuna.trial.TrialState.COMPLETE else None for t in by_number
    ]
    return {"wall_seconds": wall, "trace": trace, "values_by_number": values}


#: The user's study of the issue, over ranges (a live study is not bound to the table's values):
#: HKR's margin and tau-CE's temperature over the guidelines' ranges, alpha_kr as the table lists.
RANGED_SPACE = {
    "loss": ["hkr", "tau_ce"],
    "margin": {"low": 0.01, "high": 5.0, "log": True},
    "alpha_kr": list(ALPHAS),
    "temperature": {"low": 0.03, "high": 100.0, "log": True},
}


def guidelines_live(task: Task, n_trials: int, seed: int) -> dict[str, Any]:
    """The default study over :data:`RANGED_SPACE` (``n_trials`` trials of ``task``'s epochs)
    and each of :data:`GUIDELINE_SETTINGS` trained once for the same epochs, live; which
    settings the study's front covers (at least as good in test accuracy and certified
    accuracy)."""
    study = StudySpec.model_validate(
        {**task.study, "search_space": RANGED_SPACE, "n_trials": n_trials, "seed": seed}
    )
    settings_space = {
        "loss": sorted({setting["loss"] for setting in GUIDELINE_SETTINGS}),
        **{
            name: sorted({s[name] for s in GUIDELINE_SETTINGS if name in s})
            for name in ("margin", "alpha_kr", "temperature")
        },
    }
    settings = StudySpec.model_validate(
        {
            **task.study,
            "search_space": settings_space,
            "sampler": "random",
            "baselines": list(GUIDELINE_SETTINGS),
            "n_trials": len(GUIDELINE_SETTINGS),
            "seed": seed + 1000,
        }
    )
    front = _run_live(study)["trace"].points
    points = _run_live(settings)["values_by_number"]  # the baselines are trials 0, 1, ... in order
    return {
        "task": task.name,
        "seed": seed,
        "study_hv": hypervolume(front),
        "settings_hv": hypervolume(points),
        "covered": {
            config_key(setting): _covers(front, point)
            for setting, point in zip(GUIDELINE_SETTINGS, points, strict=True)
        },
        "settings": {config_key(s): p for s, p in zip(GUIDELINE_SETTINGS, points, strict=True)},
        "front": sorted(front),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="train the dense table of a task")
    build_parser.add_argument("--task", choices=sorted(TASKS), required=True)
    build_parser.add_argument("--threads", type=int, default=1)
    build_parser.add_argument(
        "--seed", type=int, default=0, help="training seed (build a task again to add seeds)"
    )
    build_parser.add_argument(
        "--families",
        nargs="+",
        choices=["hkr", "tau_ce", "offset_ce", "hinge", "cosine"],
        help="train only these loss families' configurations",
    )
    replay_parser = commands.add_parser("replay", help="replay every method on a task's table")
    replay_parser.add_argument("--task", choices=sorted(TASKS), required=True)
    replay_parser.add_argument("--seeds", type=int, default=20)
    replay_parser.add_argument(
        "--budget", type=float, default=2.0, help="epoch budget, in multiples of the grid's"
    )
    replay_parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    replay_parser.add_argument(
        "--eps",
        type=float,
        help="certified accuracy at this eps instead of the task's (one of the reported eps); "
        "prints the table, writes no file",
    )
    guidelines_parser = commands.add_parser(
        "guidelines", help="the default study against the guidelines' hand-picked settings"
    )
    guidelines_parser.add_argument("--task", choices=sorted(TASKS), default="fashion-5")
    guidelines_parser.add_argument("--seeds", type=int, default=20)
    guidelines_parser.add_argument("--n-trials", type=int, default=12)
    guidelines_parser.add_argument(
        "--loss", nargs="+", default=["hkr", "tau_ce", "cosine"], help="the study's families"
    )
    live_parser = commands.add_parser("live", help="confirm with real studies, one seed")
    live_parser.add_argument("--task", choices=sorted(TASKS), required=True)
    live_parser.add_argument("--n-trials", type=int, default=30, help="the guided studies' budget")
    live_parser.add_argument(
        "--methods", nargs="+", default=list(LIVE_METHODS), choices=LIVE_METHODS
    )
    live_parser.add_argument("--seed", type=int, default=0)
    guidelines_live_parser = commands.add_parser(
        "guidelines-live", help="the default study over ranges against the guideline settings, live"
    )
    guidelines_live_parser.add_argument("--task", choices=sorted(TASKS), default="fashion-5")
    guidelines_live_parser.add_argument("--n-trials", type=int, default=12)
    guidelines_live_parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "build":
        build(TASKS[args.task], args.threads, args.seed, args.families)
    elif args.command == "replay":
        task = TASKS[args.task] if args.eps is None else at_eps(TASKS[args.task], args.eps)
        summary = replay(task, args.seeds, args.budget, args.methods, write=args.eps is None)
        print(markdown(summary))
    elif args.command == "guidelines":
        summary = guidelines(TASKS[args.task], args.seeds, args.n_trials, args.loss)
        print(json.dumps(summary, indent=1))
    elif args.command == "guidelines-live":
        print(json.dumps(guidelines_live(TASKS[args.task], args.n_trials, args.seed), indent=1))
    else:
        task = TASKS[args.task]
        runs = [live(task, m, args.n_trials, args.seed) for m in args.methods]
        best = max(run["trace"].hypervolume[-1] for run in runs)
        print(f"live {task.name}, seed {args.seed}; 95 % of the better front: {0.95 * best:.4f}")
        print("| method | trials | pruned | epochs | final HV | epochs to 95 % | wall s |")
        print("|---|---|---|---|---|---|---|")
        for run in runs:
            trace = run["trace"]
            print(
                f"| {run['method']} | {trace.trials} | {trace.pruned} | {trace.epochs[-1]} | "
                f"{trace.hypervolume[-1]:.4f} | {trace.epochs_to(0.95 * best)} | "
                f"{run['wall_seconds']:.0f} |"
            )


if __name__ == "__main__":
    main()
