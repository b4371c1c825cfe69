"""Arrays a user brings: ``.npz`` files in the layout of Keras's ``mnist.npz``, and the arrays a
data-set plugin returns. Both are held to the same checks.

An ``.npz`` holds ``x_train``, ``y_train``, ``x_test``, ``y_test`` and optionally
``class_names`` (strings). Images are (N, H, W), (N, H, W, C) or (N, C, H, W) with C in
{1, 3, 4} (``layout`` says which where both ends could be channels; a 4th channel, alpha, is
dropped), or vectors (N, D); ``uint8`` in [0, 255] or floats in [0, 1]; labels integers
0..K-1. Files are read with ``allow_pickle=False``: an object array (a pickle) is refused, never
unpickled.

:func:`inspect_npz` reads the members' headers (dtype and shape) from the zip archive, then the
labels and, for float images, the value range (a float file's range is a promise only its
values can keep); :func:`read_npz` reads the arrays themselves.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from worker.trial.datasets._errors import DatasetError

Layout = Literal["nhwc", "nchw"]
ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
#: ``(x_train, y_train, x_test, y_test)``.
TrainTestArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_CHANNELS = (1, 3, 4)


@dataclass(frozen=True)
class ArraysLayout:
    """What a set of arrays holds, once checked.

    ``input_shape`` is one example as the model sees it: ``(C, H, W)`` (alpha dropped) or
    ``(D,)``; ``layout`` is how the stored images are laid out (``None`` for vectors and
    (N, H, W) images); ``scale`` divides the stored values into [0, 1].
    """

    source: str
    input_shape: tuple[int, ...]
    layout: Layout | None
    scale: float
    class_names: tuple[str, ...]
    train_examples: int
    test_examples: int


def image_layout(source: str, shape: tuple[int, ...], layout: Layout | None) -> Layout | None:
    """How a stored image array ``shape`` (with its batch dimension) is laid out."""
    if len(shape) in (2, 3):
        if layout is not None:
            raise DatasetError(
                f"{source}: dataset.layout is for 4-D images, these are {len(shape)}-D {shape}"
            )
        return None
    if len(shape) != 4:
        raise DatasetError(
            f"{source}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W), or vectors "
            f"(N, D); got shape {shape}"
        )
    last, first = shape[3] in _CHANNELS, shape[1] in _CHANNELS
    if layout is None:
        if last and first:
            raise DatasetError(
                f"{source}: shape {shape} could be (N, H, W, C) or (N, C, H, W); set "
                'dataset.layout to "nhwc" or "nchw"'
            )
        if not (last or first):
            raise DatasetError(
                f"{source}: shape {shape} has no channel axis of size 1, 3 or 4 at either end"
            )
        return "nhwc" if last else "nchw"
    channels = shape[3] if layout == "nhwc" else shape[1]
    if channels not in _CHANNELS:
        raise DatasetError(
            f"{source}: with dataset.layout {layout!r} shape {shape} has {channels} channels; "
            "images have 1, 3 or 4 (RGBA: alpha is dropped)"
        )
    return layout


def model_shape(shape: tuple[int, ...], layout: Layout | None) -> tuple[int, ...]:
    """One example's shape as the model sees it (channels first, alpha dropped)."""
    if len(shape) == 2:
        return (shape[1],)
    if len(shape) == 3:
        return (1, shape[1], shape[2])
    if layout == "nhwc":
        channels, height, width = shape[3], shape[1], shape[2]
    else:
        channels, height, width = shape[1], shape[2], shape[3]
    return (min(channels, 3), height, width)


def to_model_layout(images: np.ndarray, layout: Layout | None) -> np.ndarray:
    """Stored images as (N, C, H, W) (or (N, D) vectors), alpha dropped; values as stored."""
    if images.ndim == 2:
        return images
    if images.ndim == 3:
        return images[:, None]
    if layout == "nhwc":
        images = images.transpose(0, 3, 1, 2)
    return images[:, :3] if images.shape[1] == 4 else images


def check_value_dtype(source: str, dtype: np.dtype) -> float:
    """The divisor that maps stored values into [0, 1]: 255 for uint8, 1 for floats."""
    if dtype == np.uint8:
        return 255.0
    if np.issubdtype(dtype, np.floating):
        return 1.0
    raise DatasetError(
        f"{source}: images of dtype {dtype} are neither uint8 in [0, 255] nor floats in [0, 1]"
    )


def check_float_range(source: str, images: np.ndarray) -> None:
    """Float images must lie in [0, 1] (finite)."""
    if images.size == 0:
        return
    low, high = float(np.min(images)), float(np.max(images))
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0.0 or high > 1.0:
        raise DatasetError(
            f"{source}: float images must lie in [0, 1], these range over [{low:g}, {high:g}]; "
            "scale them (or store uint8 in [0, 255])"
        )


def check_labels(source: str, y_train: np.ndarray, y_test: np.ndarray) -> int:
    """The class count K of integer labels 0..K-1 present in both splits; raises otherwise."""
    for name, labels in (("y_train", y_train), ("y_test", y_test)):
        if labels.ndim != 1:
            raise DatasetError(
                f"{source}: {name} must be integer labels of shape (N,), got shape "
                f"{labels.shape} (one-hot labels: store their argmax)"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(f"{source}: {name} must be integers, got dtype {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise DatasetError(f"{source}: {name} holds {labels.min()}; labels are 0..K-1")
    num_classes = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
    if num_classes < 2:
        raise DatasetError(f"{source}: the labels name one class; a classifier needs two or more")
    missing = sorted(set(range(num_classes)) - set(np.unique(y_train).tolist()))
    if missing:
        raise DatasetError(
            f"{source}: y_train has no examples of classes {missing[:10]} although labels go "
            f"up to {num_classes - 1}; labels must be 0..K-1 with every class present"
        )
    return num_classes


def check_lengths(source: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Images and labels of a split have one length; both splits have one example shape."""
    for split in ("train", "test"):
        n_images, n_labels = shapes[f"x_{split}"][0], shapes[f"y_{split}"][0]
        if n_images != n_labels:
            raise DatasetError(
                f"{source}: x_{split} has {n_images} examples but y_{split} has {n_labels}"
            )
        if n_images == 0:
            raise DatasetError(f"{source}: x_{split} is empty")
    if shapes["x_train"][1:] != shapes["x_test"][1:]:
        raise DatasetError(
            f"{source}: x_train's examples are {shapes['x_train'][1:]} but x_test's are "
            f"{shapes['x_test'][1:]}"
        )


def class_names_of(source: str, names: object, num_classes: int) -> tuple[str, ...]:
    """The given class names (checked: one per class), or ``"0"`` .. ``"K-1"``."""
    if names is None:
        return tuple(str(k) for k in range(num_classes))
    values = [str(name) for name in np.asarray(names).reshape(-1).tolist()]
    if len(values) != num_classes:
        raise DatasetError(
            f"{source}: class_names has {len(values)} names for {num_classes} classes"
        )
    return tuple(values)


def check_arrays(
    source: str, arrays: Mapping[str, np.ndarray], layout: Layout | None = None
) -> ArraysLayout:
    """Every check above on arrays in memory (what a data-set plugin returns)."""
    missing = [key for key in ARRAY_KEYS if key not in arrays]
    if missing:
        raise DatasetError(f"{source}: missing arrays {missing}; expected {list(ARRAY_KEYS)}")
    values = {key: np.asarray(arrays[key]) for key in ARRAY_KEYS}
    check_lengths(source, {key: value.shape for key, value in values.items()})
    stored = image_layout(source, values["x_train"].shape, layout)
    scale = check_value_dtype(source, values["x_train"].dtype)
    if values["x_test"].dtype != values["x_train"].dtype:
        raise DatasetError(
            f"{source}: x_train is {values['x_train'].dtype} but x_test is {values['x_test'].dtype}"
        )
    if scale == 1.0:
        check_float_range(f"{source} x_train", values["x_train"])
        check_float_range(f"{source} x_test", values["x_test"])
    num_classes = check_labels(source, values["y_train"], values["y_test"])
    return ArraysLayout(
        source=source,
        input_shape=model_shape(values["x_train"].shape, stored),
        layout=stored,
        scale=scale,
        class_names=class_names_of(source, arrays.get("class_names"), num_classes),
        train_examples=len(values["y_train"]),
        test_examples=len(values["y_test"]),
    )


def _member_header(
    archive: zipfile.ZipFile, key: str, source: str
) -> tuple[tuple[int, ...], np.dtype]:
    try:
        with archive.open(f"{key}.npy") as stream:
            version = np.lib.format.read_magic(stream)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(stream)
    except KeyError:
        raise DatasetError(
            f"{source} has no array {key!r}; a Keras-layout .npz holds {list(ARRAY_KEYS)}"
        ) from None
    except ValueError as error:
        raise DatasetError(f"{source}: {key} is not a numpy array: {error}") from None
    if dtype.hasobject:
        raise DatasetError(
            f"{source}: {key} is an object array (a pickle), which liptune never loads; store "
            "numeric arrays"
        )
    return tuple(shape), dtype


def inspect_npz(path: Path, layout: Layout | None = None) -> ArraysLayout:
    """Check an ``.npz`` file from its members' headers, its labels and (float images) its
    value range; raises :class:`DatasetError` naming the file and the array."""
    source = str(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DatasetError(f"{source} is not an .npz file: {error}") from None
    with archive:
        headers = {key: _member_header(archive, key, source) for key in ARRAY_KEYS}
    check_lengths(source, {key: shape for key, (shape, _) in headers.items()})
    stored = image_layout(source, headers["x_train"][0], layout)
    scale = check_value_dtype(source, headers["x_train"][1])
    if headers["x_test"][1] != headers["x_train"][1]:
        raise DatasetError(
            f"{source}: x_train is {headers['x_train'][1]} but x_test is {headers['x_test'][1]}"
        )
    with np.load(path, allow_pickle=False) as data:
        if scale == 1.0:
            check_float_range(f"{source} x_train", data["x_train"])
            check_float_range(f"{source} x_test", data["x_test"])
        num_classes = check_labels(source, data["y_train"], data["y_test"])
        names = data["class_names"] if "class_names" in data.files else None
        class_names = class_names_of(source, names, num_classes)
    return ArraysLayout(
        source=source,
        input_shape=model_shape(headers["x_train"][0], stored),
        layout=stored,
        scale=scale,
        class_names=class_names,
        train_examples=headers["x_train"][0][0],
        test_examples=headers["x_test"][0][0],
    )


def read_npz(path: Path, layout: ArraysLayout) -> TrainTestArrays:
    """``(x_train, y_train, x_test, y_test)``: images (N, C, H, W) or (N, D) as stored
    (divide by ``layout.scale``), labels int64."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = [data[key] for key in ARRAY_KEYS]
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{path} could not be read: {error}") from None
    return to_model_arrays(arrays, layout)


def to_model_arrays(arrays: Sequence[np.ndarray], layout: ArraysLayout) -> TrainTestArrays:
    """Checked arrays in the model's layout (uint8 kept compact), labels as int64."""
    x_train, y_train, x_test, y_test = arrays
    return (
        np.ascontiguousarray(to_model_layout(np.asarray(x_train), layout.layout)),
        np.asarray(y_train, dtype=np.int64),
        np.ascontiguousarray(to_model_layout(np.asarray(x_test), layout.layout)),
        np.asarray(y_test, dtype=np.int64),
    )
