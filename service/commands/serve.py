"""``liptune serve``: the API, the web pages and local workers (the embedded default).

With no option it serves http://127.0.0.1:8000 on the stores under the data directory (SQLite for
the service and Optuna, SQLite + a folder for MLflow) and starts one ``liptune worker``
subprocess on the same stores. ``--workers 0`` makes an API-only node (workers run elsewhere).
Settings not given as flags come from ``LIPTUNE_*`` variables or ``--config FILE`` (see
:mod:`service.config`). SIGTERM or Ctrl-C stops the server, then its workers (each fails and
re-enqueues its current trial at the next epoch boundary). The workers are supervised
(:class:`Supervisor`): one that dies is logged and restarted with back-off, and ``/ready`` and
``/metrics`` report the ones running and restarting.

``--trials-per-device N`` (setting ``trials_per_device``) makes each embedded worker run N
trials on its device at once: the worker fans out to N processes with an even share of the
device's memory (see :mod:`service.commands.worker`). Each embedded worker leads its own
process group, so stopping or restarting it never leaves one of its processes behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
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


def worker_env(settings: Settings, threads: int) -> dict[str, str]:
    """The embedded workers' environment: the store URLs travel here, never on the command
    line (which every user of the machine can read), since they may hold passwords."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "LIPTUNE_STORAGE_URL": settings.resolved_storage_url(),
        "LIPTUNE_MLFLOW_URI": settings.resolved_mlflow_uri(),
    }


def worker_command(settings: Settings, index: int, threads: int) -> list[str]:
    """The command line of the ``index``-th embedded worker (stores: :func:`worker_env`)."""
    command = [
        sys.executable,
        "-m",
        "service.cli",
        "worker",
        "--data-dir",
        str(settings.resolved_home()),
        "--threads",
        str(threads),
        "--id",
        f"serve-{os.getpid()}-{index}",
    ]
    for root in settings.resolved_data_roots():
        command += ["--data-root", str(root)]
    if settings.heartbeat_interval is not None:
        command += ["--heartbeat-interval", str(settings.heartbeat_interval)]
    if settings.grace_period is not None:
        command += ["--grace-period", str(settings.grace_period)]
    if settings.trials_per_device > 1:
        command += ["--trials-per-device", str(settings.trials_per_device)]
    return command


def prepare_tracking_store(tracking_uri: str) -> None:
    """Create (or migrate) MLflow's store once, before several workers would race to, under the
    lock the workers take on a local store (an external worker may start at the same moment)."""
    from worker.tracking import TrackingConfig

    TrackingConfig(tracking_uri).client.search_experiments(max_results=1)


@dataclass
class WorkerSlot:
    """One embedded worker: its process, and what the supervisor knows about it."""

    index: int
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = 0.0
    restart_at: float | None = None
    last_exit: str | None = None

    @property
    def state(self) -> str:
        """``running``, or ``restarting`` while it waits out its back-off."""
        return "restarting" if self.restart_at is not None else "running"


def describe_exit(returncode: int) -> str:
    """``exited with status 1`` or ``killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class Supervisor:
    """Starts the embedded workers and keeps them running.

    A thread polls them every :attr:`poll_s`; a worker that exits is logged with why (its exit
    status or signal) and started again after a back-off that doubles from :attr:`BACKOFF_MIN_S`
    up to :attr:`BACKOFF_MAX_S`, and starts over once a worker has run :attr:`STABLE_S`.
    :meth:`report` is what ``/ready`` and ``/metrics`` show. A killed worker's trial is failed
    by the next worker that sees its claim go stale, and its parameters retried.
    """

    BACKOFF_MIN_S = 1.0
    BACKOFF_MAX_S = 60.0
    STABLE_S = 60.0

    def __init__(self, slots: list[WorkerSlot], poll_s: float = 0.5) -> None:
        self.slots = slots
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)
        self._thread.start()

    def _spawn(self, slot: WorkerSlot) -> None:
        with open(slot.log_path, "ab") as log:
            # A session of its own: a worker's --trials-per-device processes share its
            # process group, which _reap can clear if the worker dies before they do.
            slot.process = subprocess.Popen(
                slot.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=slot.env,
                start_new_session=True,
            )
        slot.started_at = time.monotonic()
        slot.restart_at = None

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            with self._lock:
                for slot in self.slots:
                    self._check(slot, time.monotonic())

    def _check(self, slot: WorkerSlot, now: float) -> None:
        if slot.restart_at is not None:
            if now >= slot.restart_at and not self._stopping.is_set():
                self._spawn(slot)
                slot.restarts += 1
                logger.info("worker %d restarted (restart %d)", slot.index, slot.restarts)
            return
        assert slot.process is not None
        returncode = slot.process.poll()
        if returncode is None:
            return
        _reap(slot.process)
        if now - slot.started_at >= self.STABLE_S:
            slot.backoff_s = 0.0
        slot.backoff_s = min(self.BACKOFF_MAX_S, max(self.BACKOFF_MIN_S, 2 * slot.backoff_s))
        slot.last_exit = describe_exit(returncode)
        slot.restart_at = now + slot.backoff_s
        logger.error(
            "worker %d (pid %d) %s; restarting in %.0f s (log: %s)",
            slot.index,
            slot.process.pid,
            slot.last_exit,
            slot.backoff_s,
            slot.log_path,
        )

    def report(self) -> dict[str, object]:
        """Counts by state and each worker's restarts and last exit."""
        with self._lock:
            workers = [
                {
                    "index": slot.index,
                    "state": slot.state,
                    "restarts": slot.restarts,
                    "last_exit": slot.last_exit,
                }
                for slot in self.slots
            ]
        running = sum(worker["state"] == "running" for worker in workers)
        return {"running": running, "restarting": len(workers) - running, "workers": workers}

    def stop(self) -> None:
        """SIGTERM every worker, wait for them to leave, kill the ones that do not."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        stop_workers([slot.process for slot in self.slots if slot.process is not None])


def start_workers(settings: Settings) -> Supervisor:
    """Start ``settings.workers`` supervised worker processes sharing the CPU cores evenly
    (among all their ``trials_per_device`` processes)."""
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
                index, worker_command(settings, index, threads), env, logs / f"worker-{index}.log"
            )
            for index in range(settings.workers)
        ]
    supervisor = Supervisor(slots)
    supervisor.start()
    if slots:
        logger.info("started %d worker(s); logs in %s", len(slots), slots[0].log_path.parent)
    return supervisor


def _reap(process: subprocess.Popen[bytes]) -> None:
    """Kill what is left of an exited worker's process group: the trial processes of a
    worker that was killed before it could stop them (they would train on unsupervised)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def stop_workers(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every worker (one with trial processes forwards it to them), wait for them to
    leave, kill the process groups of the ones that do not."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("worker %d did not stop in time: killed", process.pid)
        _reap(process)
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
