"""CIFAR-10's python-pickle batches, read with an unpickler that only rebuilds numpy arrays.

``cifar-10-python.tar.gz`` unpacks to ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``:
each a pickled dict with ``b"data"`` (10000, 3072) ``uint8`` rows (R, G, B planes of 32x32) and
``b"labels"``. A pickle can run arbitrary code, so anything but plain containers and numpy arrays
is refused.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from worker.trial.datasets._errors import DatasetError
from worker.trial.datasets._locate import checked_file

TRAIN_BATCHES = tuple(f"data_batch_{index}" for index in range(1, 6))
TEST_BATCH = "test_batch"
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DatasetError(f"refusing to unpickle {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch: images ``uint8`` (N, 3, 32, 32) and labels int64 (N,)."""
    with path.open("rb") as stream:
        try:
            batch = _ArrayUnpickler(stream, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError) as error:
            raise DatasetError(f"{path} is not a CIFAR-10 python batch: {error}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DatasetError(f"{path} holds no b'data' and b'labels' (not a CIFAR-10 batch)")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DatasetError(f"{path}: data {data.shape} and labels {labels.shape} do not match")
    return data.reshape(-1, 3, 32, 32), labels


def write_cifar_dataset(
    directory: Path,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
) -> None:
    """Write images ``uint8`` (N, 3, 32, 32) and labels (N,) as CIFAR-10 python batches in
    ``directory`` (created): the training set split into :data:`TRAIN_BATCHES` (sizes differing
    by at most one), the test set in :data:`TEST_BATCH`, with the originals' layout (``b"data"``
    rows of R, G, B planes, ``b"labels"`` a list of ints) in pickle protocol 4 (Python 3's
    protocol 2 would pickle the pixels through ``_codecs``, which the reader refuses). What a
    generated stand-in for CIFAR-10 is written as (``scripts/gpu-check.sh``); :func:`read_batch`
    reads it back."""
    for name, images, labels in (("x_train", x_train, y_train), ("x_test", x_test, y_test)):
        if images.dtype != np.uint8 or images.shape[1:] != (3, 32, 32):
            raise ValueError(f"{name} must be uint8 of shape (N, 3, 32, 32), got {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{name} has {len(images)} images but {len(labels)} labels")
    directory.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(len(x_train)), len(TRAIN_BATCHES))
    batches = [
        (name, x_train[rows], y_train[rows])
        for name, rows in zip(TRAIN_BATCHES, parts, strict=True)
    ]
    for name, images, labels in [*batches, (TEST_BATCH, x_test, y_test)]:
        batch = {
            b"data": np.ascontiguousarray(images.reshape(len(images), -1)),
            b"labels": [int(label) for label in labels],
        }
        with (directory / name).open("wb") as stream:
            pickle.dump(batch, stream, protocol=4)


def cifar_files(directory: Path, roots: Sequence[Path]) -> dict[str, Path] | None:
    """The six batch files of ``directory``, or ``None`` if one lacks."""
    found = {}
    for name in (*TRAIN_BATCHES, TEST_BATCH):
        path = checked_file(directory, [name], roots)
        if path is None:
            return None
        found[name] = path
    return found


def read_cifar_dataset(files: dict[str, Path]) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_test, y_test)`` with images ``uint8`` (N, 3, 32, 32)."""
    train = [read_batch(files[name]) for name in TRAIN_BATCHES]
    x_test, y_test = read_batch(files[TEST_BATCH])
    x_train = np.concatenate([images for images, _ in train])
    y_train = np.concatenate([labels for _, labels in train])
    return x_train, y_train, x_test, y_test
