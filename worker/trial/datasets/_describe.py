"""What a data set spec stands for before any pixel is decoded: ``describe_dataset``.

For the sets liptune ships this is the registry entry; for a user's image folder or ``.npz`` file
it is read from the files' structure and headers (:mod:`worker.trial.datasets._folder`,
:mod:`worker.trial.datasets._arrays`), for a plugin from the arrays it returns. The API checks a
submission with it, the cost estimate sizes a trial with it, the loader splits with it.
Descriptions are cached per process and per file state (path, size, modification time).

The data roots a worker reads from are set once per process (:func:`set_data_roots`, from
``--data-root`` or the data directory); the API passes its own explicitly.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from worker.common._paths import default_data_roots, liptune_home
from worker.spec import DatasetSpec
from worker.trial.datasets._arrays import ArraysLayout, check_arrays, inspect_npz
from worker.trial.datasets._errors import DatasetError
from worker.trial.datasets._folder import FolderLayout, inspect_folder
from worker.trial.datasets._registry import DatasetInfo, Kind, dataset_info

_CACHE_SIZE = 32
_lock = threading.Lock()
#: What identifies a data set's files as inspected (kind, paths, sizes, times, options): the
#: inspection cache's key and the decode cache's.
SourceKey = tuple[Hashable, ...]
_Inspected = tuple[FolderLayout | ArraysLayout, Path | None, SourceKey]
_cache: OrderedDict[SourceKey, _Inspected] = OrderedDict()
_data_roots: list[Path] | None = None


def set_data_roots(roots: Sequence[Path] | None) -> None:
    """The directories this process reads data from (``None``: those of the data directory)."""
    global _data_roots
    _data_roots = None if roots is None else [Path(root) for root in roots]


def data_roots() -> list[Path]:
    """This process's data roots (:func:`set_data_roots`, else the data directory's)."""
    return list(_data_roots) if _data_roots is not None else default_data_roots(liptune_home())


@dataclass(frozen=True)
class DatasetDescription:
    """A data set as a spec selects it: shape, classes and size, known before loading.

    ``class_names`` and ``num_classes`` are those the model tells apart (after ``classes``);
    ``all_class_names`` those of the data set. ``train_examples`` bounds the train + validation
    pool (after the class subset, before ``n_samples``); 0 when ``n_samples`` decides (synthetic
    sets). ``cache_bytes`` is what the decoded set holds in a worker's memory (``uint8`` images
    of a folder, the arrays of an ``.npz`` or a plugin), 0 for the sets liptune ships.
    ``layout`` is the folder's or the arrays' inspected layout (``None`` for the others);
    ``source_key`` changes when the files do (the decode cache's key).
    """

    name: str
    kind: Kind
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    all_class_names: tuple[str, ...]
    class_indices: tuple[int, ...] | None
    train_examples: int
    cache_bytes: int
    layout: FolderLayout | ArraysLayout | None = None
    path: Path | None = None
    source_key: SourceKey = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def task(self) -> Literal["binary", "multiclass"]:
        return "binary" if self.num_classes == 2 else "multiclass"

    @property
    def is_image(self) -> bool:
        """Whether examples are images (C, H, W), which augmentation and conv nets need."""
        return len(self.input_shape) == 3


def class_indices(
    classes: Sequence[int | str] | None, class_names: Sequence[str], name: str
) -> tuple[int, ...] | None:
    """The label indices ``classes`` names (by index or by class name), in the given order;
    :class:`DatasetError` names those the data set does not have."""
    if not classes:
        return None
    indices: list[int] = []
    unknown: list[int | str] = []
    for item in classes:
        if isinstance(item, str):
            if item in class_names:
                indices.append(list(class_names).index(item))
            else:
                unknown.append(item)
        elif 0 <= item < len(class_names):
            indices.append(item)
        else:
            unknown.append(item)
    if unknown:
        raise DatasetError(
            f"classes {unknown} do not exist in {name!r}: its labels are "
            f"0..{len(class_names) - 1} ({', '.join(class_names)})",
            field="classes",
        )
    if len(set(indices)) != len(indices):
        raise DatasetError(f"classes {list(classes)} name one class twice", field="classes")
    return tuple(indices)


def _remember(key: SourceKey, value: _Inspected) -> None:
    with _lock:
        _cache[key] = value
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)


def _cached(key: SourceKey) -> _Inspected | None:
    with _lock:
        value = _cache.get(key)
        if value is not None:
            _cache.move_to_end(key)
        return value


def _folder_stamp(directory: Path, depth: int = 3) -> tuple[tuple[str, int], ...]:
    """Modification times of the folder and its sub-folders (``depth`` levels): adding,
    removing or renaming an image changes its folder's time."""
    stamps = [(str(directory), directory.stat().st_mtime_ns)]
    if depth:
        for entry in sorted(os.scandir(directory), key=lambda entry: entry.name):
            if entry.is_dir(follow_symlinks=False):
                stamps += _folder_stamp(Path(entry.path), depth - 1)
    return tuple(stamps)


def _inspect(info: DatasetInfo, spec: DatasetSpec, roots: Sequence[Path]) -> _Inspected:
    if info.kind == "plugin":
        key: SourceKey = ("plugin", info.name, spec.layout)
        found = _cached(key)
        if found is None:
            assert info.loader is not None
            try:
                arrays = info.loader()
            except Exception as error:
                raise DatasetError(
                    f"data set {info.name!r} ({info.source}) failed to load: {error}"
                ) from None
            found = (check_arrays(f"data set {info.name!r}", arrays, spec.layout), None, key)
            _remember(key, found)
        return found
    (path,) = info.locate(roots, spec.path).values()
    size = tuple(spec.size) if spec.size else None
    if info.kind == "folder":
        key = ("folder", _folder_stamp(path), size)
    else:
        stat = path.stat()
        key = ("npz", str(path), stat.st_size, stat.st_mtime_ns, spec.layout)
    found = _cached(key)
    if found is None:
        if info.kind == "folder":
            found = (inspect_folder(path, roots, size), path, key)
        else:
            found = (inspect_npz(path, spec.layout), path, key)
        _remember(key, found)
    return found


def describe_dataset(spec: DatasetSpec, roots: Sequence[Path] | None = None) -> DatasetDescription:
    """The data set ``spec`` selects, described without decoding it.

    ``roots`` (the data roots) defaults to this process's (:func:`data_roots`). Raises
    :class:`DatasetError` naming the file and what is wrong with it.
    """
    info = dataset_info(spec.name)
    if info.kind not in ("folder", "npz", "plugin"):
        selected = class_indices(spec.classes, info.class_names, info.name)
        train = info.train_examples
        if selected is not None and train:
            train = -(-train * len(selected) // info.num_classes)
        return DatasetDescription(
            name=info.name,
            kind=info.kind,
            input_shape=info.input_shape,
            class_names=_subset(info.class_names, selected),
            all_class_names=info.class_names,
            class_indices=selected,
            train_examples=train,
            cache_bytes=0,
        )
    roots = list(roots) if roots is not None else data_roots()
    layout, path, source_key = _inspect(info, spec, roots)
    if isinstance(layout, FolderLayout):
        names, train = layout.class_names, len(layout.train)
        total = layout.n_images
        element = 1
    else:
        names, train = layout.class_names, layout.train_examples
        total = layout.train_examples + layout.test_examples
        element = 1 if layout.scale == 255.0 else 4
    selected = class_indices(spec.classes, names, info.name)
    if selected is not None:
        train = -(-train * len(selected) // len(names))
    pixels = 1
    for size in layout.input_shape:
        pixels *= size
    return DatasetDescription(
        name=info.name,
        kind=info.kind,
        input_shape=layout.input_shape,
        class_names=_subset(names, selected),
        all_class_names=names,
        class_indices=selected,
        train_examples=train,
        cache_bytes=total * (pixels * element + 8),
        layout=layout,
        path=path,
        source_key=source_key,
    )


def _subset(names: tuple[str, ...], selected: tuple[int, ...] | None) -> tuple[str, ...]:
    return names if selected is None else tuple(names[index] for index in selected)


def clear_descriptions() -> None:
    """Forget every cached description (e.g. after replacing files in place)."""
    with _lock:
        _cache.clear()


__all__ = [
    "DatasetDescription",
    "DatasetError",
    "class_indices",
    "clear_descriptions",
    "data_roots",
    "describe_dataset",
    "set_data_roots",
]
