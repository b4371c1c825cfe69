"""The one supervisor of worker processes, on real processes: ``"always"`` restarts any exit
(serve's workers), ``"on-failure"`` restarts a failed process and lets one that exits 0 be done
(a worker's ``--trials-per-device`` processes under ``--once``)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from service.supervisor import Supervisor, WorkerSlot


def _slot(index: int, code: str) -> WorkerSlot:
    return WorkerSlot(index, [sys.executable, "-c", code], dict(os.environ))


def test_on_failure_restarts_a_failed_process_and_ends_when_all_are_done(tmp_path: Path):
    marker = tmp_path / "failed-once"
    fails_once = (
        "import pathlib, sys; m = pathlib.Path("
        f"{str(marker)!r}); sys.exit(0) if m.exists() else (m.touch(), sys.exit(3))"
    )
    supervisor = Supervisor(
        [_slot(0, "pass"), _slot(1, fails_once)], restart="on-failure", poll_s=0.05
    )
    supervisor.BACKOFF_MIN_S = 0.1
    supervisor.start()
    try:
        supervisor.wait()
    finally:
        supervisor.stop()
    report = supervisor.report()
    assert [w["state"] for w in report["workers"]] == ["done", "done"]
    assert [w["restarts"] for w in report["workers"]] == [0, 1]
    assert report["workers"][1]["last_exit"] == "exited with status 0"
    assert report["running"] == report["restarting"] == 0


def test_always_restarts_a_process_that_exits_0(tmp_path: Path):
    supervisor = Supervisor([_slot(0, "pass")], restart="always", poll_s=0.05)
    supervisor.BACKOFF_MIN_S = 0.1
    supervisor.start()
    try:
        deadline = time.monotonic() + 30
        while supervisor.report()["workers"][0]["restarts"] < 2:
            assert time.monotonic() < deadline, supervisor.report()
            time.sleep(0.05)
    finally:
        supervisor.stop()
    assert supervisor.report()["workers"][0]["last_exit"] == "exited with status 0"
