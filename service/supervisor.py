"""The one supervisor of worker processes: ``liptune serve``'s embedded workers and the trial
processes of ``liptune worker --trials-per-device N``.

Serve's workers each lead a session of their own, so that what one started (its trial
processes) can be killed with it; a worker's trial processes stay in the worker's process group
(``own_sessions=False``), which is what serve kills when that worker dies. A thread polls them
every :attr:`Supervisor.poll_s`; a process that exits is logged with why (its exit status or
signal) and, per the restart policy, started again after a back-off that doubles from
:attr:`Supervisor.BACKOFF_MIN_S` up to :attr:`Supervisor.BACKOFF_MAX_S` and starts over once a
process has run :attr:`Supervisor.STABLE_S`:

- ``"always"`` (serve's workers, which never end on their own): any exit;
- ``"on-failure"`` (a worker's trial processes, which end with ``--once`` or ``--max-trials``):
  a non-zero status or a signal; a process that exits 0 is done.

A killed worker's trial is failed by the next worker that sees its claim go stale, and its
parameters retried.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: Seconds a worker gets to leave cleanly after SIGTERM before it is killed.
WORKER_STOP_TIMEOUT_S = 60.0

Restart = Literal["always", "on-failure"]

logger = logging.getLogger("liptune.supervisor")


@dataclass
class WorkerSlot:
    """One supervised process: its command, and what the supervisor knows about it.
    ``log_path`` ``None``: the process writes to the supervisor's own stdout and stderr."""

    index: int
    command: list[str]
    env: dict[str, str]
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = 0.0
    restart_at: float | None = None
    last_exit: str | None = None
    done: bool = False

    @property
    def state(self) -> str:
        """``running``, ``restarting`` while it waits out its back-off, or ``done``."""
        if self.done:
            return "done"
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
    """Starts the processes of ``slots`` and keeps them running under ``restart``.

    :meth:`report` is what ``/ready`` and ``/metrics`` show; :meth:`wait` returns once every
    process is done (``"on-failure"``); :meth:`stop` ends them all.
    """

    BACKOFF_MIN_S = 1.0
    BACKOFF_MAX_S = 60.0
    STABLE_S = 60.0

    def __init__(
        self,
        slots: list[WorkerSlot],
        restart: Restart = "always",
        *,
        own_sessions: bool = True,
        poll_s: float = 0.5,
    ) -> None:
        self.slots = slots
        self.restart = restart
        self.own_sessions = own_sessions
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._all_done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)
        self._thread.start()

    def _spawn(self, slot: WorkerSlot) -> None:
        with contextlib.ExitStack() as files:
            log = None if slot.log_path is None else files.enter_context(open(slot.log_path, "ab"))
            slot.process = subprocess.Popen(
                slot.command,
                stdout=log,
                stderr=None if log is None else subprocess.STDOUT,
                env=slot.env,
                start_new_session=self.own_sessions,
            )
        slot.started_at = time.monotonic()
        slot.restart_at = None

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            with self._lock:
                for slot in self.slots:
                    self._check(slot, time.monotonic())
                if all(slot.done for slot in self.slots):
                    self._all_done.set()
                    return

    def _check(self, slot: WorkerSlot, now: float) -> None:
        if slot.done:
            return
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
        if self.own_sessions:
            _reap(slot.process)
        slot.last_exit = describe_exit(returncode)
        if returncode == 0 and self.restart == "on-failure":
            slot.done = True
            return
        if now - slot.started_at >= self.STABLE_S:
            slot.backoff_s = 0.0
        slot.backoff_s = min(self.BACKOFF_MAX_S, max(self.BACKOFF_MIN_S, 2 * slot.backoff_s))
        slot.restart_at = now + slot.backoff_s
        logger.error(
            "worker %d (pid %d) %s; restarting in %.0f s%s",
            slot.index,
            slot.process.pid,
            slot.last_exit,
            slot.backoff_s,
            "" if slot.log_path is None else f" (log: {slot.log_path})",
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
        restarting = sum(worker["state"] == "restarting" for worker in workers)
        return {"running": running, "restarting": restarting, "workers": workers}

    def wait(self) -> None:
        """Block until every process is done (never, under ``"always"``, unless stopped)."""
        while not self._all_done.wait(self.poll_s) and not self._stopping.is_set():
            pass

    def stop(self) -> None:
        """SIGTERM every process, wait for them to leave, kill the ones that do not."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        stop_workers([slot.process for slot in self.slots if slot.process is not None])


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
