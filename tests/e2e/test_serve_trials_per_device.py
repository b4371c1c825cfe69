"""`liptune serve --trials-per-device N`: each embedded worker fans out to N trial processes,
and none of them outlives its worker: a worker killed from outside has its trial processes
killed by the supervisor before it is restarted, and stopping serve stops them all."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from service.commands.worker import worker_command
from service.config import Settings
from tests.e2e.test_reliability_serve import Server
from tests.e2e.test_serve_e2e import wait_until

pytestmark = pytest.mark.slow


def test_the_setting_reaches_the_embedded_worker_command(monkeypatch: pytest.MonkeyPatch):
    assert "--trials-per-device" not in worker_command(Settings(), worker_id="serve-0", threads=1)
    monkeypatch.setenv("LIPTUNE_TRIALS_PER_DEVICE", "3")
    command = worker_command(Settings(), worker_id="serve-0", threads=1)
    assert command[command.index("--trials-per-device") + 1] == "3"
    with pytest.raises(ValueError, match="trials_per_device"):
        Settings(trials_per_device=0)


def children(pid: int) -> list[int]:
    """The children of ``pid`` made by any of its threads (the supervisor's restarts come
    from its own thread, which ``/proc/PID/task/PID/children`` does not list)."""
    found = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in listing.read_text().split()]
        except FileNotFoundError:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_fanned_out_workers_are_supervised_and_leave_no_orphan(tmp_path: Path):
    server = Server(
        tmp_path / "home",
        tmp_path / "serve.log",
        "--workers",
        "1",
        "--trials-per-device",
        "2",
        env={"LIPTUNE_HEARTBEAT_INTERVAL": "1", "LIPTUNE_GRACE_PERIOD": "4"},
    )
    try:
        wait_until(server.answers, 120, "the server did not answer", server.log)

        def fanned_out() -> tuple[int, list[int]] | None:
            workers = [pid for pid in children(server.process.pid) if alive(pid)]
            trials = [pid for pid in children(workers[0]) if alive(pid)] if workers else []
            return (workers[0], trials) if len(workers) == 1 and len(trials) == 2 else None

        worker, trials = wait_until(fanned_out, 120, "no worker fanned out to 2", server.log)
        os.kill(worker, signal.SIGKILL)  # its trial processes cannot be told: orphans
        wait_until(
            lambda: not any(alive(pid) for pid in trials),
            30,
            "a killed worker's trial processes outlived it",
            server.log,
        )
        restarted, new_trials = wait_until(
            lambda: (found := fanned_out()) and found[0] != worker and found,
            120,
            "the worker was not restarted with 2 trial processes",
            server.log,
        )
        assert not set(new_trials) & set(trials)
    finally:
        server.close()
    assert server.process.returncode == 128 + signal.SIGTERM  # serve's answer to SIGTERM
    left = [pid for pid in (restarted, *new_trials) if alive(pid)]
    assert left == [], f"processes left after serve stopped: {left}"
