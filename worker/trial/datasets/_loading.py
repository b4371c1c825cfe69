"""``load_dataset``: from a :class:`~worker.spec.DatasetSpec` to cached tensor splits.

Splitting rules, the same for every data set:

- the test split is the data set's own (IDX ``t10k``, CIFAR ``test_batch``, a folder's
  ``test``, an ``.npz``'s ``x_test``) or, for bundled and synthetic sets and one-level image
  folders, a fixed 20 % carved out with a fixed seed, so every trial is scored on the same
  points;
- synthetic sets are generated with ``n_samples`` points (default 2,000) from a fixed seed;
  for the others ``n_samples`` subsamples the training pool;
- ``validation_fraction`` of the training pool becomes the validation split; the subsample and
  this split follow the trial's ``seed``;
- ``classes`` keeps those classes and relabels them 0..k-1 in the given order.

Raw arrays are cached per resolved files (path, size, mtime; a folder's sub-folders' times) as
stored (``uint8`` images stay ``uint8``: an image folder is decoded once per worker) and the
finished splits per spec and seed, so the trials of a study load their data once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from sklearn.datasets import load_digits

from worker.spec import DatasetSpec
from worker.trial.datasets import _synthetic as synthetic
from worker.trial.datasets._arrays import ArraysLayout, read_npz, to_model_arrays
from worker.trial.datasets._cifar import read_cifar_dataset
from worker.trial.datasets._describe import DatasetDescription, SourceKey, describe_dataset
from worker.trial.datasets._errors import DatasetError
from worker.trial.datasets._folder import FolderLayout, read_folder
from worker.trial.datasets._idx import read_idx_dataset
from worker.trial.datasets._registry import DatasetInfo, dataset_info
from worker.trial.datasets._splits import DataSplits, Split

TEST_FRACTION = 0.2
DEFAULT_SYNTHETIC_SAMPLES = 2000
#: Generation of synthetic sets and carving of test splits do not depend on the trial's seed.
DATA_SEED = 0
_RAW_CACHE_SIZE = 4
_ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
_SPLITS_CACHE_SIZE = 16

_GENERATORS: dict[str, Callable[[int, float, int], tuple[np.ndarray, np.ndarray]]] = {
    "two-moons": synthetic.two_moons,
    "snowflake": synthetic.snowflake,
    "spheres": synthetic.spheres,
}


@dataclass(frozen=True)
class _Raw:
    """Arrays as stored (``x / scale`` is in [0, 1]); ``x_test`` is None when not split yet."""

    x_pool: np.ndarray
    y_pool: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    scale: float


_lock = threading.Lock()
_raw_cache: OrderedDict[SourceKey, _Raw] = OrderedDict()
_splits_cache: OrderedDict[SourceKey, DataSplits] = OrderedDict()
_Key = TypeVar("_Key")
_Value = TypeVar("_Value")


def load_dataset(spec: DatasetSpec, *, data_roots: Sequence[Path], seed: int) -> DataSplits:
    """Load (or take from the cache) the splits of the data set ``spec`` names.

    Files are only read from inside ``data_roots``. Raises :class:`DatasetError` with what to
    install or which path to set when the data set is missing, when ``spec.classes`` names
    a class the data set lacks, and naming the file that could not be decoded.
    """
    info = dataset_info(spec.name)
    description = describe_dataset(spec, data_roots)
    if info.kind in ("folder", "npz", "plugin"):
        raw_key: SourceKey = description.source_key
    else:
        files = info.locate(data_roots, spec.path)
        raw_key = (
            info.name,
            tuple(
                (role, str(path), path.stat().st_size, path.stat().st_mtime_ns)
                for role, path in sorted(files.items())
            ),
        )
    if info.kind == "synthetic":
        raw_key += (spec.n_samples or DEFAULT_SYNTHETIC_SAMPLES, spec.noise)
    splits_key = (
        raw_key,
        description.class_indices,
        spec.validation_fraction,
        spec.n_samples,
        seed,
    )
    with _lock:
        if splits_key in _splits_cache:
            _splits_cache.move_to_end(splits_key)
            return _splits_cache[splits_key]
        raw = _raw_cache.get(raw_key)
    if raw is None:
        raw = _read_raw(info, spec, description, data_roots)
        with _lock:
            _remember(_raw_cache, raw_key, raw, _RAW_CACHE_SIZE)
    splits = _make_splits(info, description, raw, spec, seed)
    with _lock:
        _remember(_splits_cache, splits_key, splits, _SPLITS_CACHE_SIZE)
    return splits


def clear_cache() -> None:
    """Forget every cached data set (e.g. after replacing files in place)."""
    with _lock:
        _raw_cache.clear()
        _splits_cache.clear()


def _remember(cache: OrderedDict[_Key, _Value], key: _Key, value: _Value, size: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)


def _read_raw(
    info: DatasetInfo,
    spec: DatasetSpec,
    description: DatasetDescription,
    data_roots: Sequence[Path],
) -> _Raw:
    if info.kind == "synthetic":
        n_samples = spec.n_samples or DEFAULT_SYNTHETIC_SAMPLES
        x, y = _GENERATORS[info.name](n_samples, spec.noise, DATA_SEED)
        return _Raw(x, y, None, None, scale=1.0)
    if info.kind == "bundled":
        digits = load_digits()
        images = digits.images.astype(np.float32)[:, None]
        return _Raw(images, digits.target.astype(np.int64), None, None, scale=16.0)
    layout = description.layout
    if isinstance(layout, FolderLayout):
        return _Raw(*read_folder(layout), scale=255.0)
    if isinstance(layout, ArraysLayout):
        if info.kind == "npz":
            assert description.path is not None
            arrays = read_npz(description.path, layout)
        else:
            assert info.loader is not None
            loaded = info.loader()
            arrays = to_model_arrays([loaded[key] for key in _ARRAY_KEYS], layout)
        return _Raw(*arrays, scale=layout.scale)
    files = info.locate(data_roots, spec.path)
    reader = read_idx_dataset if info.file_format == "idx" else read_cifar_dataset
    x_train, y_train, x_test, y_test = reader(files)
    if tuple(x_train.shape[1:]) != info.input_shape:
        raise DatasetError(
            f"{info.name}: images of shape {tuple(x_train.shape[1:])}, expected {info.input_shape}"
        )
    return _Raw(x_train, y_train, x_test, y_test, scale=255.0)


def _select(x: np.ndarray, y: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    relabel = np.full(int(max(classes)) + 1, -1, dtype=np.int64)
    relabel[list(classes)] = np.arange(len(classes))
    keep = np.isin(y, classes)
    return x[keep], relabel[y[keep]]


def _make_splits(
    info: DatasetInfo,
    description: DatasetDescription,
    raw: _Raw,
    spec: DatasetSpec,
    seed: int,
) -> DataSplits:
    x_pool, y_pool, x_test, y_test = raw.x_pool, raw.y_pool, raw.x_test, raw.y_test
    if x_test is None or y_test is None:  # not split yet (_Raw sets both or neither)
        order = np.random.default_rng(DATA_SEED).permutation(len(y_pool))
        n_test = round(TEST_FRACTION * len(order))
        x_test, y_test = x_pool[order[:n_test]], y_pool[order[:n_test]]
        x_pool, y_pool = x_pool[order[n_test:]], y_pool[order[n_test:]]
    if description.class_indices is not None:
        x_pool, y_pool = _select(x_pool, y_pool, description.class_indices)
        x_test, y_test = _select(x_test, y_test, description.class_indices)
    order = np.random.default_rng(seed).permutation(len(y_pool))
    if spec.n_samples is not None and info.kind != "synthetic":
        order = order[: spec.n_samples]
    n_val = round(spec.validation_fraction * len(order))
    if len(order) - n_val < 1:
        raise DatasetError(f"{info.name}: no training examples left; raise n_samples")

    def split(x: np.ndarray, y: np.ndarray, index: np.ndarray | None = None) -> Split:
        if index is not None:
            x, y = x[index], y[index]
        inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if raw.scale != 1.0:
            inputs = inputs / raw.scale
        return Split(inputs, torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)))

    return DataSplits(
        train=split(x_pool, y_pool, np.sort(order[n_val:])),
        val=split(x_pool, y_pool, np.sort(order[:n_val])),
        test=split(x_test, y_test),
        input_shape=description.input_shape,
        num_classes=description.num_classes,
        task=description.task,
        class_names=description.class_names,
    )
