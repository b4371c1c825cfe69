"""The import directions of DESIGN.md, checked by import-linter's contracts in pyproject.toml:
the core imports nothing of the project, the worker nothing of the service, the dashboards
nothing of the service or the worker, and routers do not import each other."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_every_import_contract_is_kept() -> None:
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    contracts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert len(contracts["contracts"]) == 4
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


def test_a_router_importing_another_breaks_the_contract(tmp_path: Path) -> None:
    """The contract is live: a copy of the project where one router imports another fails it."""
    copy = tmp_path / "project"
    for package in ("liptune", "worker", "service", "dashboards"):
        shutil.copytree(REPO_ROOT / package, copy / package)
    (copy / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())
    trials = copy / "service" / "routers" / "trials.py"
    trials.write_text(trials.read_text() + "\nfrom service.routers import studies  # noqa\n")
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=copy,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "Routers do not import each other BROKEN" in result.stdout
