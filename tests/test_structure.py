"""The import directions of DESIGN.md, checked by import-linter's contracts in pyproject.toml:
the core imports nothing of the project, the worker nothing of the service, the dashboards
nothing of the service or the worker, routers do not import each other, the worker's packages
import in one direction (common <- tracking <- trial <- search <- study <- loop), and the
service and the dashboards import only the surfaces of the worker's packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _contracts() -> list[dict]:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return config["tool"]["importlinter"]["contracts"]


def test_every_import_contract_is_kept() -> None:
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert len(_contracts()) == 6
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 kept, 0 broken" in result.stdout


def test_the_surface_contract_names_every_private_worker_module() -> None:
    """A private module added to the worker is forbidden to the service without anyone having
    to remember to list it."""
    (surfaces,) = [c for c in _contracts() if "package surfaces" in c["name"]]
    private = {
        ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
        for path in (REPO_ROOT / "worker").rglob("_*.py")
        if path.name != "__init__.py"
    }
    assert private
    assert set(surfaces["forbidden_modules"]) == private


def _lint_a_copy_where(tmp_path: Path, module: str, line: str) -> subprocess.CompletedProcess:
    """import-linter run on a copy of the project where ``module`` (a path) gained ``line``."""
    copy = tmp_path / "project"
    for package in ("liptune", "worker", "service", "dashboards"):
        shutil.copytree(REPO_ROOT / package, copy / package)
    (copy / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())
    target = copy / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=copy,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        (
            "service/routers/trials.py",
            "from service.routers import studies",
            "Routers do not import each other",
        ),
        (
            "worker/trial/_run.py",
            "from worker.study import StudyStore",
            "The worker's packages import in one direction",
        ),
        (
            "service/routers/health.py",
            "from worker.study._store import StudyStore",
            "The service and the dashboards import only the worker's package surfaces",
        ),
    ],
    ids=["router-imports-router", "trial-imports-study", "service-imports-private-module"],
)
def test_each_contract_can_break(tmp_path: Path, module: str, line: str, broken: str) -> None:
    """The contracts are live: a copy of the project with one forbidden import fails its own."""
    result = _lint_a_copy_where(tmp_path, module, line)
    assert result.returncode != 0
    assert f"{broken} BROKEN" in result.stdout
    assert "5 kept, 1 broken" in result.stdout
