"""``liptune worker``: run trials of every running study until stopped.

Start one per GPU (``--device cuda:N``) or per group of CPU cores (``--threads N``), on any machine
that reaches the storage and the MLflow tracking server::

    liptune worker --storage postgresql://liptune@db/liptune --mlflow http://mlflow:5000 \\
        --device cuda:0

Without options it uses the embedded default under the data directory (``--data-dir``,
``$LIPTUNE_HOME`` or ``~/.liptune``). SIGTERM or Ctrl-C stops the current trial at its next
epoch boundary (it is failed and re-enqueued) and exits.

``--trials-per-device N`` runs N trials on the device at once, as N worker processes (ids
``ID-0`` .. ``ID-{N-1}``, the CPU cores shared among them): each gets an even share of the
device's memory (:func:`worker.trial._devices.trial_budget_bytes`) and never claims a trial of a
study estimated above it (``--memory-budget`` sets the share by hand)::

    liptune worker --device cuda:0 --trials-per-device 4
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from sqlalchemy.engine import make_url

from worker.common import install_log_redaction

HELP = "run trials of every running study until stopped"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def _device(text: str) -> str:
    base, _, index = text.partition(":")
    if base not in ("auto", "cpu", "cuda") or (index and (base != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"device must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna/service database: sqlite:///FILE or postgresql://... (default: "
        "$LIPTUNE_STORAGE_URL, else sqlite:///DATA_DIR/liptune.db; prefer the variable for a "
        "URL with a password: command lines are visible to every user of the machine)",
    )
    parser.add_argument(
        "--mlflow",
        metavar="URI",
        help="MLflow tracking URI, or `none` to record results in the study only "
        "(default: $LIPTUNE_MLFLOW_URI, else sqlite:///DATA_DIR/mlflow.db, artifacts in "
        "DATA_DIR/mlartifacts)",
    )
    parser.add_argument(
        "--data-dir", metavar="DIR", help="data directory (default: $LIPTUNE_HOME or ~/.liptune)"
    )
    parser.add_argument(
        "--data-root",
        metavar="DIR",
        action="append",
        type=Path,
        help="directory data sets may be read from; repeat for several "
        "(default: DATA_DIR/datasets and /usr/share/datasets)",
    )
    parser.add_argument(
        "--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N (default: auto)"
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="CPU threads of this worker (default: torch's)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=_positive_int,
        metavar="S",
        default=None,
        help="seconds between heartbeats of the running trial (default: 30)",
    )
    parser.add_argument(
        "--grace-period",
        type=_positive_int,
        metavar="S",
        default=None,
        help="seconds without a heartbeat after which a trial's worker counts as dead "
        "(default: 120)",
    )
    parser.add_argument(
        "--max-trials", type=_positive_int, metavar="N", help="exit after running N trials"
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="exit as soon as no running study has a free trial slot",
    )
    parser.add_argument(
        "--trials-per-device",
        type=_positive_int,
        metavar="N",
        default=1,
        help="trials run at once on the device, one process each (default: 1)",
    )
    parser.add_argument(
        "--memory-budget",
        type=_positive_int,
        metavar="MIB",
        help="device memory one trial may plan to use; studies estimated above it are left to "
        "other workers (default with --trials-per-device N > 1: the device's share)",
    )
    parser.add_argument("--id", metavar="NAME", help="worker id (default: HOSTNAME-PID)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    install_log_redaction()
    # Heavy imports only once the arguments are known to be valid.
    import torch

    from worker.common import (
        default_artifact_root,
        default_data_roots,
        default_storage_url,
        liptune_home,
    )
    from worker.loop import WorkerOptions, default_worker_id, run_worker
    from worker.study import DEFAULT_GRACE_PERIOD_S, DEFAULT_HEARTBEAT_INTERVAL_S
    from worker.tracking import TrackingConfig

    home = liptune_home(args.data_dir)
    storage = args.storage or os.environ.get("LIPTUNE_STORAGE_URL")
    mlflow_uri = args.mlflow or os.environ.get("LIPTUNE_MLFLOW_URI")
    tracking: TrackingConfig | None
    if mlflow_uri is None:
        tracking = TrackingConfig.for_home(home)
    elif mlflow_uri.lower() == "none":
        tracking = None
    elif _is_local_store(mlflow_uri):
        tracking = TrackingConfig(mlflow_uri, default_artifact_root(home))
    else:
        tracking = TrackingConfig(mlflow_uri)
    budget = args.memory_budget * 2**20 if args.memory_budget else None
    if args.trials_per_device > 1:
        from worker.trial import resolve_device, run_processes, trial_budget_bytes

        try:
            device = resolve_device(args.device)
            budget = budget or trial_budget_bytes(device, args.trials_per_device)
        except ValueError as error:
            print(f"liptune worker: error: {error}", file=sys.stderr)
            return 2
        return run_processes(
            _device_workers(args, str(device), budget // 2**20, args.id or default_worker_id())
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    options = WorkerOptions(
        storage_url=storage or default_storage_url(home),
        tracking=tracking,
        data_roots=args.data_root or default_data_roots(home),
        device=args.device,
        threads=args.threads,
        heartbeat_interval=args.heartbeat_interval or DEFAULT_HEARTBEAT_INTERVAL_S,
        grace_period=args.grace_period or DEFAULT_GRACE_PERIOD_S,
        worker_id=args.id or default_worker_id(),
        max_trials=args.max_trials,
        exit_when_idle=args.once,
        memory_budget=budget,
    )
    if options.grace_period <= options.heartbeat_interval:
        print(
            f"liptune worker: error: --grace-period ({options.grace_period} s) must exceed "
            f"--heartbeat-interval ({options.heartbeat_interval} s), or live trials would be "
            "failed as stale",
            file=sys.stderr,
        )
        return 2
    from service.migrations import upgrade

    upgrade(options.storage_url)
    run_worker(options)
    return 0


def _device_workers(
    args: argparse.Namespace, device: str, budget_mib: int, worker_id: str
) -> list[list[str]]:
    """The command lines of the ``--trials-per-device`` worker processes of one device."""
    count = args.trials_per_device
    threads = args.threads or max(1, (os.cpu_count() or 1) // count)
    common = [sys.executable, "-m", "service.cli", "worker", "--device", device]
    common += ["--threads", str(threads), "--memory-budget", str(budget_mib)]
    common += ["--log-level", args.log_level]
    for flag, value in (
        ("--storage", args.storage),
        ("--mlflow", args.mlflow),
        ("--data-dir", args.data_dir),
        ("--heartbeat-interval", args.heartbeat_interval),
        ("--grace-period", args.grace_period),
        ("--max-trials", args.max_trials),
    ):
        if value is not None:
            common += [flag, str(value)]
    for root in args.data_root or []:
        common += ["--data-root", str(root)]
    if args.once:
        common.append("--once")
    return [[*common, "--id", f"{worker_id}-{index}"] for index in range(count)]


def _is_local_store(tracking_uri: str) -> bool:
    """Whether MLflow writes artifacts itself (a database or file store) rather than a server."""
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return False
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        return True
    return make_url(tracking_uri).get_backend_name() in ("sqlite", "postgresql", "mysql")
