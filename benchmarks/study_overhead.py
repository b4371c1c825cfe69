"""What the study machinery costs a trial, and how trials/hour scale with workers.

1. Machinery share: a study searched by GPSampler (one loss family, two ranges, two objectives)
   with 50 finished trials (told synthetic values, with their claims, so the sampler and the
   budget count see a realistic history), then real 10-epoch digits trials run by a real
   :class:`worker.loop.Worker`. For each trial, the machinery time is the worker's wall time for
   the whole trial (study list, stale check, claim, ask with GPSampler, tell, claim bookkeeping)
   minus the time inside ``run_trial``, plus the heartbeats that a trial of this length sends
   (measured, times the number of heartbeat intervals it lasts). Target: < 2 % of the trial.
   Measured twice: against the bare trial (no MLflow, the harder case) and against the trial as
   workers run it (MLflow run, logged model, ONNX export).
2. Scaling: ``liptune worker`` processes with one torch thread each on a fresh study of
   ``--scale-trials`` 10-epoch digits trials per worker; trials/hour of 2 workers against 1
   worker, from the trials' completion times while every worker is busy (process start-up, each
   worker's first, warm-up trial and the lone tail excluded), 1-worker and 2-worker runs
   alternated ``--scale-repeats`` times, medians compared. Target: >= 1.7x.

Usage: ``python benchmarks/study_overhead.py [--trials 3] [--scale-trials 15]
[--scale-repeats 3] [--scaling-only]``. Ratios are against
baselines measured in the same run; on a machine shared with other work, read them as such.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import optuna
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from service.migrations import upgrade  # noqa: E402
from worker import claims, pool  # noqa: E402
from worker.search._space import suggest_params  # noqa: E402
from worker.spec import StudySpec  # noqa: E402
from worker.study._engine import DEFAULT_HEARTBEAT_INTERVAL_S  # noqa: E402
from worker.study._store import StudyStore  # noqa: E402
from worker.study._studies import create_study, optuna_study_name  # noqa: E402
from worker.tracking._mlflow import TrackingConfig  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPEC = {
    "name": "overhead",
    "dataset": {"name": "digits"},
    "model": {"name": "mlp", "widths": [64, 64]},
    "training": {"epochs": 10, "batch_size": 128, "lr": 0.005, "device": "cpu"},
    "search_space": {
        "loss": "hkr",
        "margin": {"low": 0.01, "high": 2.0, "log": True},
        "alpha_kr": {"low": 1.0, "high": 1000.0, "log": True},
    },
    "objectives": [{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.3}],
    "n_trials": 100,
    "sampler": "gp",
}


def populate(storage_url: str, study_id: str, spec: StudySpec, finished: int) -> None:
    """``finished`` completed trials with synthetic objective values, and their claims."""
    store = StudyStore(storage_url)
    study = store.load_study(
        optuna_study_name(study_id), sampler=optuna.samplers.RandomSampler(seed=0)
    )
    for _ in range(finished):
        claim = store.claim(study.study_name, n_trials=spec.n_trials, worker_id="populate")
        assert claim is not None
        trial = study.ask()
        params = suggest_params(trial, spec.search_space)
        accuracy = 0.95 - 0.1 * params["margin"]
        store.attach(claim, trial)
        store.finish_claim(claim, claims.COMPLETE)
        study.tell(trial, [accuracy, params["margin"] * (1 - accuracy)])


def machinery_share(trials: int, *, tracked: bool) -> dict[str, float]:
    spec = StudySpec.model_validate(SPEC)
    with tempfile.TemporaryDirectory() as directory:
        tracking = TrackingConfig.for_home(Path(directory)) if tracked else None
        storage_url = f"sqlite:///{directory}/liptune.db"
        study_id = uuid.uuid4().hex
        create_study(storage_url, spec, study_id)
        upgrade(storage_url)
        populate(storage_url, study_id, spec, finished=50)

        inside: list[float] = []
        sampling: list[float] = []
        real_run_trial, real_suggest = pool.run_trial, pool.suggest_params

        def timed(function, times):  # type: ignore[no-untyped-def]
            def call(*args, **kwargs):  # type: ignore[no-untyped-def]
                started = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    times.append(time.perf_counter() - started)

            return call

        pool.run_trial = timed(real_run_trial, inside)
        pool.suggest_params = timed(real_suggest, sampling)
        try:
            worker = pool.Worker(
                pool.WorkerOptions(
                    storage_url=storage_url, tracking=tracking, threads=1, device="cpu"
                )
            )
            worker.run_next()  # warm-up: first optimizer and first GP fit import lazily
            inside.clear()
            sampling.clear()
            totals = []
            for _ in range(trials):
                started = time.perf_counter()
                assert worker.run_next()
                totals.append(time.perf_counter() - started)
        finally:
            pool.run_trial, pool.suggest_params = real_run_trial, real_suggest

        claim = worker.study._store.claim(
            optuna_study_name(study_id), n_trials=spec.n_trials, worker_id="hb"
        )
        assert claim is not None
        beats = []
        for _ in range(10):
            started = time.perf_counter()
            worker.study._store.heartbeat(claim, 1)
            beats.append(time.perf_counter() - started)

    trial_s = statistics.median(inside)
    beat_s = statistics.median(beats)
    heartbeats = beat_s * max(1.0, trial_s / DEFAULT_HEARTBEAT_INTERVAL_S)
    machinery_s = statistics.median(t - i for t, i in zip(totals, inside, strict=True))
    return {
        "trial_s": trial_s,
        "machinery_s": machinery_s,
        "sampling_s": statistics.median(sampling),
        "heartbeat_s": beat_s,
        "share": (machinery_s + heartbeats) / trial_s,
    }


def throughput(workers: int, n_trials: int, home: Path) -> float:
    """Trials/hour of ``workers`` worker processes (1 thread each) on one fresh study."""
    spec = StudySpec.model_validate({**SPEC, "n_trials": n_trials, "sampler": "tpe"})
    storage_url = f"sqlite:///{home / f'scale-{workers}.db'}"
    study_id = uuid.uuid4().hex
    create_study(storage_url, spec, study_id)
    command = [
        sys.executable,
        "-m",
        "service.cli",
        "worker",
        "--storage",
        storage_url,
        "--mlflow",
        "none",
        "--data-dir",
        str(home),
        "--threads",
        "1",
        "--device",
        "cpu",
        "--once",
        "--log-level",
        "WARNING",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen([*command, "--id", f"w{index}"], cwd=REPO_ROOT, env=env)
        for index in range(workers)
    ]
    for process in processes:
        if process.wait() != 0:
            raise RuntimeError(f"a worker exited with {process.returncode}")
    study = optuna.load_study(study_name=optuna_study_name(study_id), storage=storage_url)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == n_trials
    # Steady state: each worker's first trial pays one-off imports (torch's optimizer loads
    # torch._dynamo on first use) and the last worker to run out of slots runs alone, so the
    # window is from the last worker's first completed trial to the first worker's last one:
    # every worker is busy in it. Throughput is the completions in the window over its length
    # (counting only the trials that also started in it would drop the ones straddling its
    # edges, which only happens with several workers).
    by_worker: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for trial in complete:
        by_worker.setdefault(trial.user_attrs["liptune.worker"], []).append(trial)
    if len(by_worker) < workers:
        raise RuntimeError(f"only {len(by_worker)} of {workers} workers ran trials")
    opened = max(min(t.datetime_complete for t in trials) for trials in by_worker.values())
    closed = min(max(t.datetime_complete for t in trials) for trials in by_worker.values())
    completed = [t for t in complete if opened < t.datetime_complete <= closed]
    if not completed:
        raise RuntimeError("no trial ran while every worker was busy; raise --scale-trials")
    return 3600 * len(completed) / (closed - opened).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="measured real trials")
    parser.add_argument("--scale-trials", type=int, default=15, help="trials per worker")
    parser.add_argument(
        "--scale-repeats",
        type=int,
        default=3,
        help="1-worker and 2-worker runs, alternated; the ratio of the medians is reported",
    )
    parser.add_argument("--scaling-only", action="store_true", help="skip the machinery share")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()}")

    runs = () if args.scaling_only else (False, True)
    for tracked in runs:
        what = "as workers run it, with MLflow" if tracked else "without MLflow"
        share = machinery_share(args.trials, tracked=tracked)
        print(
            f"10-epoch digits trial {what}: {share['trial_s']:.2f} s; machinery per trial at 50 "
            f"finished trials: {share['machinery_s'] * 1000:.0f} ms, of which GPSampler's "
            f"suggestion {share['sampling_s'] * 1000:.0f} ms; one heartbeat: "
            f"{share['heartbeat_s'] * 1000:.1f} ms; share: {100 * share['share']:.2f} % "
            f"(target < 2 %)"
        )
    ones, twos = [], []
    for repeat in range(args.scale_repeats):
        with tempfile.TemporaryDirectory() as directory:
            home = Path(directory)
            ones.append(throughput(1, args.scale_trials, home))
            twos.append(throughput(2, 2 * args.scale_trials, home))
        print(f"  run {repeat + 1}: 1 worker {ones[-1]:.0f}, 2 workers {twos[-1]:.0f} trials/hour")
    one, two = statistics.median(ones), statistics.median(twos)
    print(
        f"trials/hour (medians of {args.scale_repeats}): 1 worker {one:.0f}, 2 workers "
        f"{two:.0f}, ratio {two / one:.2f}x (target >= 1.7x)"
    )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
