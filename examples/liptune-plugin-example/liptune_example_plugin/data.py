"""``bars``: 12x12 grey images of a horizontal, a vertical or a diagonal bar (three classes).

A data-set plugin is a callable with no arguments that returns the arrays ``x_train``,
``y_train``, ``x_test``, ``y_test`` (optionally ``class_names``), in the layout of Keras's
``mnist.npz``: images ``(N, H, W)`` uint8 in [0, 255] (or floats in [0, 1]), integer labels.
liptune checks them as it checks a user's ``.npz`` file. Its first docstring paragraph is the
description ``GET /datasets`` shows.
"""

from __future__ import annotations

import numpy as np

SIZE = 12
CLASS_NAMES = ("horizontal", "vertical", "diagonal")


def _images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASS_NAMES), size=count)
    images = rng.integers(0, 60, size=(count, SIZE, SIZE)).astype(np.uint8)
    rows = np.arange(SIZE)
    for index, (label, offset) in enumerate(
        zip(labels, rng.integers(2, SIZE - 2, size=count), strict=True)
    ):
        if label == 0:
            images[index, offset, :] = 255
        elif label == 1:
            images[index, :, offset] = 255
        else:
            images[index, rows, (rows + offset) % SIZE] = 255
    return images, labels.astype(np.int64)


def load() -> dict[str, np.ndarray]:
    """Bars in three orientations: 12x12 grey images, 1,200 train and 300 test (generated)."""
    x_train, y_train = _images(1200, seed=0)
    x_test, y_test = _images(300, seed=1)
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "class_names": np.array(CLASS_NAMES),
    }
