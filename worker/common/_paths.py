"""Where the embedded default keeps its stores: everything lives under one data directory.

``LIPTUNE_HOME`` (or ``--data-dir``) names it; the default is ``~/.liptune``. The service's tables
and Optuna's live in one SQLite file, MLflow in another with its artifacts beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Where Debian's dataset packages (e.g. ``dataset-fashion-mnist``) put their files.
SYSTEM_DATA_ROOT = Path("/usr/share/datasets")


def liptune_home(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory, created if needed: ``data_dir``, else ``$LIPTUNE_HOME``, else
    ``~/.liptune``."""
    chosen = data_dir or os.environ.get("LIPTUNE_HOME") or Path.home() / ".liptune"
    home = Path(chosen).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def default_storage_url(home: Path) -> str:
    """Service tables and the Optuna storage (one SQLite file)."""
    return f"sqlite:///{home / 'liptune.db'}"


def default_tracking_uri(home: Path) -> str:
    """MLflow's tracking and registry store (its own SQLite file)."""
    return f"sqlite:///{home / 'mlflow.db'}"


def default_artifact_root(home: Path) -> Path:
    """Where MLflow writes artifacts when it tracks into :func:`default_tracking_uri`."""
    root = home / "mlartifacts"
    root.mkdir(parents=True, exist_ok=True)
    return root


def default_data_roots(home: Path) -> list[Path]:
    """Directories a spec may read data sets from: ``home/datasets`` and the system's."""
    return [home / "datasets", SYSTEM_DATA_ROOT]
