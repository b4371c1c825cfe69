"""``liptune serve``: the API, the web pages and local workers (the embedded default).

With no option it serves http://127.0.0.1:8000 on the stores under the data directory (SQLite for
the service and Optuna, SQLite + a folder for MLflow) and starts one ``liptune worker``
subprocess on the same stores. ``--workers 0`` makes an API-only node (workers run elsewhere).
Settings not given as flags come from ``LIPTUNE_*`` variables or ``--config FILE`` (see
:mod:`service.config`). SIGTERM or Ctrl-C stops the server, then its workers (each fails and
re-enqueues its current trial at the next epoch boundary). The workers are supervised
(:class:`service.supervisor.Supervisor`): one that dies is logged and restarted with back-off, and
``/ready`` and ``/metrics`` report the ones running and restarting.

``--trials-per-device N`` (setting ``trials_per_device``) makes each embedded worker run N
trials on its device at once: the worker fans out to N processes with an even share of the
device's memory (see :mod:`service.commands.worker`). Each embedded worker leads its own
process group, so stopping or restarting it never leaves one of its processes behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from service.supervisor import Supervisor, WorkerSlot

if TYPE_CHECKING:
    from service.config import Settings

HELP = "run the API, the web pages and local workers (the embedded default)"

logger = logging.getLogger("liptune.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default: 8000)")
    parser.add_argument(
        "--data-dir", type=Path, help="data directory (default: $LIPTUNE_HOME or ~/.liptune)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="local `liptune worker` processes (default: 1; 0: API only)",
    )
    parser.add_argument(
        "--trials-per-device",
        type=int,
        metavar="N",
        help="concurrent trials of each local worker on its device (default: 1)",
    )
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="service and Optuna database (default: sqlite:///DATA_DIR/liptune.db)",
    )
    parser.add_argument(
        "--mlflow",
        metavar="URI",
        help="MLflow tracking URI (default: sqlite:///DATA_DIR/mlflow.db)",
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML or JSON file of settings")
    parser.add_argument("--log-level", default="info", help="logging level (default: info)")


def prepare_tracking_store(tracking_uri: str) -> None:
    """Create (or migrate) MLflow's store once, before several workers would race to, under the
    lock the workers take on a local store (an external worker may start at the same moment)."""
    from worker.tracking import TrackingConfig

    TrackingConfig(tracking_uri).client.search_experiments(max_results=1)


def start_workers(settings: Settings) -> Supervisor:
    """Start ``settings.workers`` supervised worker processes sharing the CPU cores evenly
    (among all their ``trials_per_device`` processes)."""
    from service.commands.worker import worker_command, worker_env

    slots = []
    if settings.workers:
        prepare_tracking_store(settings.resolved_mlflow_uri())
        processes = settings.workers * settings.trials_per_device
        threads = max(1, (os.cpu_count() or 1) // processes)
        logs = settings.resolved_home() / "logs"
        logs.mkdir(exist_ok=True)
        env = worker_env(settings, threads)
        slots = [
            WorkerSlot(
                index,
                worker_command(settings, worker_id=f"serve-{os.getpid()}-{index}", threads=threads),
                env,
                logs / f"worker-{index}.log",
            )
            for index in range(settings.workers)
        ]
    supervisor = Supervisor(slots, restart="always")
    supervisor.start()
    if slots:
        logger.info("started %d worker(s); logs in %s", len(slots), logs)
    return supervisor


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    import uvicorn

    from service.app import create_app
    from service.config import Settings

    overrides = {
        "host": args.host,
        "port": args.port,
        "home": args.data_dir,
        "workers": args.workers,
        "trials_per_device": args.trials_per_device,
        "storage_url": args.storage,
        "mlflow_uri": args.mlflow,
        "config_file": args.config,
    }
    settings = Settings(**{key: value for key, value in overrides.items() if value is not None})
    app = create_app(settings)  # migrates the stores before any worker opens them
    supervisor = start_workers(settings)
    app.state.supervisor = supervisor
    # uvicorn re-raises the SIGTERM/SIGINT it caught once it has shut down; with this handler
    # that ends in an exception, so the workers are stopped below instead of orphaned.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                log_level=args.log_level.lower(),
                access_log=False,
            )
        )
        server.run()
    finally:
        supervisor.stop()
    return 0
