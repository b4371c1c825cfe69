"""``liptune serve``: the API, the web pages and local workers (the embedded default).

With no option it serves http://127.0.0.1:8000 on the stores under the data directory (SQLite for
the service and Optuna, SQLite + a folder for MLflow) and starts one ``liptune worker``
subprocess on the same stores. ``--workers 0`` makes an API-only node (workers run elsewhere).
Settings not given as flags come from ``LIPTUNE_*`` variables or ``--config FILE`` (see
:mod:`service.config`). SIGTERM or Ctrl-C stops the server, then its workers (each fails and
re-enqueues its current trial at the next epoch boundary).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.config import Settings

HELP = "run the API, the web pages and local workers (the embedded default)"
#: Seconds a worker gets to leave cleanly after SIGTERM before it is killed.
WORKER_STOP_TIMEOUT_S = 60.0

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


def worker_command(settings: Settings, index: int, threads: int) -> list[str]:
    """The command line of the ``index``-th embedded worker."""
    command = [
        sys.executable,
        "-m",
        "service.cli",
        "worker",
        "--storage",
        settings.resolved_storage_url(),
        "--mlflow",
        settings.resolved_mlflow_uri(),
        "--data-dir",
        str(settings.resolved_home()),
        "--threads",
        str(threads),
        "--id",
        f"serve-{os.getpid()}-{index}",
    ]
    for root in settings.resolved_data_roots():
        command += ["--data-root", str(root)]
    return command


def prepare_tracking_store(tracking_uri: str) -> None:
    """Create (or migrate) MLflow's store once, before several workers would race to."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri).search_experiments(max_results=1)


def start_workers(settings: Settings) -> list[subprocess.Popen[bytes]]:
    """Start ``settings.workers`` worker processes sharing the CPU cores evenly."""
    if settings.workers == 0:
        return []
    prepare_tracking_store(settings.resolved_mlflow_uri())
    threads = max(1, (os.cpu_count() or 1) // settings.workers)
    logs = settings.resolved_home() / "logs"
    logs.mkdir(exist_ok=True)
    processes = []
    for index in range(settings.workers):
        with open(logs / f"worker-{index}.log", "ab") as log:
            processes.append(
                subprocess.Popen(
                    worker_command(settings, index, threads),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                )
            )
    logger.info("started %d worker(s); logs in %s", len(processes), logs)
    return processes


def stop_workers(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every worker, wait for them to leave, kill the ones that do not."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("worker %d did not stop in time: killed", process.pid)
            process.kill()
            process.wait()


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
        "storage_url": args.storage,
        "mlflow_uri": args.mlflow,
        "config_file": args.config,
    }
    settings = Settings(**{key: value for key, value in overrides.items() if value is not None})
    app = create_app(settings)  # migrates the stores before any worker opens them
    processes = start_workers(settings)
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
        stop_workers(processes)
    return 0
