"""The IDX format of MNIST and Fashion-MNIST (plain or gzip-compressed).

A file is a 4-byte magic ``0x00 0x00 <type> <ndim>`` followed by ``ndim`` big-endian int32 sizes
and the data in row-major order; both data sets use unsigned bytes (type ``0x08``).
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from worker.trial.datasets._errors import DatasetError
from worker.trial.datasets._locate import checked_file

_UNSIGNED_BYTE = 0x08
#: (train images, train labels, test images, test labels); both spellings found in the wild.
IDX_STEMS = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """The array stored in one IDX file (``uint8``, shape as the header says)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        payload = stream.read()
    if len(payload) < 4 or payload[0] != 0 or payload[1] != 0:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    if payload[2] != _UNSIGNED_BYTE:
        raise DatasetError(f"{path}: IDX type 0x{payload[2]:02x} is not unsigned bytes")
    ndim = payload[3]
    header_end = 4 + 4 * ndim
    shape = tuple(int(size) for size in np.frombuffer(payload[4:header_end], dtype=">i4"))
    data = np.frombuffer(payload, dtype=np.uint8, offset=header_end)
    if data.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def idx_files(directory: Path, roots: Sequence[Path]) -> dict[str, Path] | None:
    """The four IDX files of ``directory`` (each plain or ``.gz``), or ``None`` if one lacks."""
    found = {}
    for role, stems in IDX_STEMS.items():
        names = [name for stem in stems for name in (stem, f"{stem}.gz")]
        path = checked_file(directory, names, roots)
        if path is None:
            return None
        found[role] = path
    return found


def read_idx_dataset(files: dict[str, Path]) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_test, y_test)``: images ``uint8`` (N, 1, H, W), labels int64."""
    arrays = {role: read_idx(path) for role, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(
                f"IDX {split} files disagree: images {images.shape}, labels {labels.shape}"
            )
    return (
        arrays["train_images"][:, None],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"][:, None],
        arrays["test_labels"].astype(np.int64),
    )
