"""Finding a data set's directory without ever leaving the configured data roots.

A spec names data by a path relative to (or inside) one of the worker's data roots. Every
candidate is resolved (``..`` and symlinks followed) before it is checked, so neither a crafted
path nor a symlink placed in a root can make the worker read elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from worker.trial.datasets._errors import DatasetError


def resolved_roots(data_roots: Sequence[Path]) -> list[Path]:
    """The data roots, with ``~`` expanded and symlinks resolved."""
    return [Path(root).expanduser().resolve() for root in data_roots]


def inside_roots(path: Path, roots: Sequence[Path]) -> bool:
    """Whether the fully resolved ``path`` lies in one of the (resolved) ``roots``."""
    resolved = path.resolve()
    return any(resolved.is_relative_to(root) for root in roots)


def resolve_user_path(path: str, roots: Sequence[Path], want: str = "dir") -> Path:
    """The directory (``want="dir"``) or file (``"file"``) a spec's ``dataset.path`` names,
    resolved and checked against ``roots``.

    An absolute path must resolve inside a root; a relative one is tried under each root in
    order. Raises :class:`DatasetError` when the path leaves the roots or is not a directory
    (a file).
    """
    given = Path(path).expanduser()
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    outside = []
    for candidate in candidates:
        resolved = candidate.resolve()
        if not inside_roots(resolved, roots):
            outside.append(resolved)
            continue
        if resolved.is_dir() if want == "dir" else resolved.is_file():
            return resolved
    roots_text = ", ".join(str(root) for root in roots) or "(none configured)"
    if outside and len(outside) == len(candidates):
        raise DatasetError(
            f"dataset.path {path!r} resolves to {outside[0]}, outside the data roots "
            f"({roots_text}); move the files under a data root or add one with --data-root"
        )
    what = "a directory" if want == "dir" else "a file"
    raise DatasetError(
        f"dataset.path {path!r} is not {what} under any data root ({roots_text}); "
        f"give {what} relative to a data root, or add its parent with --data-root"
    )


def find_default_dir(dir_names: Sequence[str], roots: Sequence[Path]) -> Path | None:
    """The first ``root / name`` that is a directory inside its root, or ``None``."""
    for root in roots:
        for name in dir_names:
            candidate = (root / name).resolve()
            if candidate.is_dir() and candidate.is_relative_to(root):
                return candidate
    return None


def checked_file(directory: Path, names: Sequence[str], roots: Sequence[Path]) -> Path | None:
    """The first of ``names`` present in ``directory`` whose resolved file is inside ``roots``."""
    for name in names:
        candidate = directory / name
        if candidate.is_file() and inside_roots(candidate, roots):
            return candidate.resolve()
    return None
