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
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url

from worker.common import install_log_redaction

if TYPE_CHECKING:
    from service.config import Settings

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


def settings_from(args: argparse.Namespace) -> Settings:
    """The one settings object of serve and worker (:class:`service.config.Settings`: flags over
    ``LIPTUNE_*`` variables over ``--config``'s file), with this command's flags applied."""
    from service.config import Settings

    overrides = {
        "home": args.data_dir,
        "storage_url": args.storage,
        "mlflow_uri": args.mlflow,
        "data_roots": args.data_root,
        "heartbeat_interval": args.heartbeat_interval,
        "grace_period": args.grace_period,
        "trials_per_device": args.trials_per_device,
    }
    return Settings(**{key: value for key, value in overrides.items() if value is not None})


def worker_env(settings: Settings, threads: int) -> dict[str, str]:
    """A spawned worker's environment: the store URLs travel here, never on the command line
    (which every user of the machine can read), since they may hold passwords."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "LIPTUNE_STORAGE_URL": settings.resolved_storage_url(),
        "LIPTUNE_MLFLOW_URI": settings.mlflow_uri
        if _tracking_off(settings)
        else settings.resolved_mlflow_uri(),
    }


def worker_command(
    settings: Settings,
    *,
    worker_id: str,
    threads: int,
    device: str | None = None,
    memory_budget_mib: int | None = None,
    max_trials: int | None = None,
    once: bool = False,
    log_level: str | None = None,
) -> list[str]:
    """The command line of a spawned ``liptune worker`` (its stores: :func:`worker_env`): an
    embedded worker of ``liptune serve`` (which fans out itself when ``trials_per_device`` > 1)
    or one trial process of a worker that fanned out (``device`` and ``memory_budget_mib``
    given, ``trials_per_device`` 1)."""
    command = [sys.executable, "-m", "service.cli", "worker"]
    command += ["--data-dir", str(settings.resolved_home()), "--threads", str(threads)]
    command += ["--id", worker_id]
    for root in settings.resolved_data_roots():
        command += ["--data-root", str(root)]
    for flag, value in (
        ("--device", device),
        ("--memory-budget", memory_budget_mib),
        ("--heartbeat-interval", settings.heartbeat_interval),
        ("--grace-period", settings.grace_period),
        ("--max-trials", max_trials),
        ("--log-level", log_level),
    ):
        if value is not None:
            command += [flag, str(value)]
    if memory_budget_mib is None and settings.trials_per_device > 1:
        command += ["--trials-per-device", str(settings.trials_per_device)]
    if once:
        command.append("--once")
    return command


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    install_log_redaction()
    try:
        settings = settings_from(args)
    except ValueError as error:
        print(f"liptune worker: error: {error}", file=sys.stderr)
        return 2
    from worker.study import DEFAULT_GRACE_PERIOD_S, DEFAULT_HEARTBEAT_INTERVAL_S

    heartbeat = settings.heartbeat_interval or DEFAULT_HEARTBEAT_INTERVAL_S
    grace = settings.grace_period or DEFAULT_GRACE_PERIOD_S
    if grace <= heartbeat:
        print(
            f"liptune worker: error: --grace-period ({grace} s) must exceed "
            f"--heartbeat-interval ({heartbeat} s), or live trials would be failed as stale",
            file=sys.stderr,
        )
        return 2
    # Heavy imports only once the arguments are known to be valid.
    import torch

    from worker.common import default_artifact_root
    from worker.loop import WorkerOptions, default_worker_id, run_worker
    from worker.tracking import TrackingConfig

    home = settings.resolved_home()
    tracking: TrackingConfig | None
    if _tracking_off(settings):
        tracking = None
    else:
        mlflow_uri = settings.resolved_mlflow_uri()
        local = _is_local_store(mlflow_uri)
        tracking = TrackingConfig(mlflow_uri, default_artifact_root(home) if local else None)
    budget = args.memory_budget * 2**20 if args.memory_budget else None
    worker_id = args.id or default_worker_id()
    if settings.trials_per_device > 1:
        from worker.trial import resolve_device, trial_budget_bytes

        try:
            device = resolve_device(args.device)
            budget = budget or trial_budget_bytes(device, settings.trials_per_device)
        except ValueError as error:
            print(f"liptune worker: error: {error}", file=sys.stderr)
            return 2
        return _fan_out(args, settings, str(device), budget // 2**20, worker_id)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    options = WorkerOptions(
        storage_url=settings.resolved_storage_url(),
        tracking=tracking,
        data_roots=settings.resolved_data_roots(),
        device=args.device,
        threads=args.threads,
        heartbeat_interval=heartbeat,
        grace_period=grace,
        worker_id=worker_id,
        max_trials=args.max_trials,
        exit_when_idle=args.once,
        memory_budget=budget,
    )
    from service.migrations import upgrade

    upgrade(options.storage_url)
    run_worker(options)
    return 0


def _fan_out(
    args: argparse.Namespace, settings: Settings, device: str, budget_mib: int, worker_id: str
) -> int:
    """Run the ``trials_per_device`` trial processes of one device under the supervisor: one
    that fails is restarted, one that exits 0 (``--once``, ``--max-trials``) is done; SIGTERM
    and SIGINT stop them all (each fails and re-enqueues its trial at the next epoch)."""
    from service.supervisor import Supervisor, WorkerSlot

    count = settings.trials_per_device
    threads = args.threads or max(1, (os.cpu_count() or 1) // count)
    env = worker_env(settings, threads)
    slots = [
        WorkerSlot(
            index,
            worker_command(
                settings,
                worker_id=f"{worker_id}-{index}",
                threads=threads,
                device=device,
                memory_budget_mib=budget_mib,
                max_trials=args.max_trials,
                once=args.once,
                log_level=args.log_level,
            ),
            env,
        )
        for index in range(count)
    ]
    # In this worker's process group: what serve kills if this worker dies.
    supervisor = Supervisor(slots, restart="on-failure", own_sessions=False)
    previous = {
        signum: signal.signal(signum, _exit_on_signal) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        supervisor.start()
        supervisor.wait()
    except SystemExit:
        pass
    finally:
        supervisor.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _tracking_off(settings: Settings) -> bool:
    """``--mlflow none``: results are recorded in the study only."""
    return settings.mlflow_uri is not None and settings.mlflow_uri.lower() == "none"


def _is_local_store(tracking_uri: str) -> bool:
    """Whether MLflow writes artifacts itself (a database or file store) rather than a server."""
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return False
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        return True
    return make_url(tracking_uri).get_backend_name() in ("sqlite", "postgresql", "mysql")
