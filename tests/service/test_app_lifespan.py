"""The app's background work lives in its lifespan: a process that creates the app, or serves it
and stops, and exits at once exits cleanly (status 0), not in an abort of torch's C++ (134).

The exit raced the cost model's warm-up thread, so each case runs in fresh interpreters a few
times; one of them runs a test file alone under pytest, as ``pytest tests/worker/test_conv_zoo.py``
did.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 3

APP = """
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings


def make_app(home):
    return create_app(Settings(home=home, storage_url=f"sqlite:///{home}/l.db", cache_ttl_s=0))
"""

#: Create the app and exit at once (it used to start the warm-up thread in ``create_app``).
CREATE = APP + "\nmake_app(__import__('sys').argv[1])\n"
#: Serve it (start and stop its lifespan) and exit at once.
SERVE = APP + "\nwith TestClient(make_app(__import__('sys').argv[1])):\n    pass\n"
#: A test file whose last test serves the app and ends.
TEST_FILE = APP + textwrap.dedent(
    """
    def test_ready(tmp_path):
        with TestClient(make_app(tmp_path)) as client:
            assert client.get("/health").status_code == 200
    """
)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_creating_or_serving_the_app_then_exiting_exits_cleanly(tmp_path: Path) -> None:
    for index in range(ROUNDS):
        for name, script in (("create", CREATE), ("serve", SERVE)):
            home = tmp_path / f"{name}{index}"
            home.mkdir()
            done = _run(["-c", script, str(home)], cwd=home)
            assert done.returncode == 0, (name, index, done.returncode, done.stderr[-2000:])


def test_a_test_file_run_alone_exits_cleanly(tmp_path: Path) -> None:
    (tmp_path / "test_alone.py").write_text(TEST_FILE)
    done = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "test_alone.py"], cwd=tmp_path)
    assert done.returncode == 0, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
