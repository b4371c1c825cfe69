"""Image folders in torchvision's ``ImageFolder`` layout, read with Pillow as data.

Two layouts are read::

    DIR/train/<class>/<image>   and   DIR/test/<class>/<image>     (the user's own test split)
    DIR/<class>/<image>                                            (a fixed test split is carved)

Classes are the sub-folders' names in sorted order (label ``k`` is the ``k``-th name), as
``ImageFolder`` numbers them. A file counts as an image when its extension is one Pillow
registers (``.png``, ``.jpg``, ``.bmp``, ``.tif``, ``.webp``, ...); other files and hidden ones
are skipped, as ``ImageFolder`` skips them.

:func:`inspect_folder` reads the layout and each image's header only (Pillow opens files lazily:
size and mode, not the pixels), which is what a submission can afford; :func:`read_folder`
decodes every image once into one ``uint8`` array (N, C, H, W). The channel layout is the same
for every image: RGB as soon as one image is in colour, else grey; an alpha channel is dropped.
All images have one size, or are resized (bilinear, Pillow's ``reduce``-aware ``resize``) to
``size = (H, W)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from worker.trial.datasets._errors import DatasetError
from worker.trial.datasets._locate import inside_roots

SPLIT_DIRS = ("train", "test")
#: Modes whose pixels carry no colour (``P`` is decided by its palette, ``LA``/``La`` are grey
#: with alpha).
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def image_extensions() -> frozenset[str]:
    """Every file extension Pillow can open here (lower case, with the dot)."""
    return frozenset(ext.lower() for ext in Image.registered_extensions())


@dataclass(frozen=True)
class ImageFile:
    """One image of the folder and its label."""

    path: Path
    label: int


@dataclass(frozen=True)
class FolderLayout:
    """What the headers of a folder say: its classes, its images per split, one shape.

    ``test`` is ``None`` in the one-level layout (the loader carves a test split).
    ``input_shape`` is ``(C, H, W)`` after conversion and resizing.
    """

    directory: Path
    class_names: tuple[str, ...]
    train: tuple[ImageFile, ...]
    test: tuple[ImageFile, ...] | None
    input_shape: tuple[int, int, int]

    @property
    def n_images(self) -> int:
        return len(self.train) + len(self.test or ())


def _class_dirs(directory: Path) -> list[Path]:
    return sorted(
        (entry for entry in directory.iterdir() if entry.is_dir() and not _hidden(entry)),
        key=lambda entry: entry.name,
    )


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _images(class_dir: Path, label: int, roots: Sequence[Path]) -> list[ImageFile]:
    extensions = image_extensions()
    found = []
    for root, dirs, names in os.walk(class_dir, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(root) / name
            if name.startswith(".") or path.suffix.lower() not in extensions:
                continue
            if not inside_roots(path, roots):
                raise DatasetError(f"{path} leaves the data roots through a symbolic link")
            found.append(ImageFile(path, label))
    return found


def _split(split_dir: Path, class_names: Sequence[str], roots: Sequence[Path]) -> list[ImageFile]:
    files: list[ImageFile] = []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        images = _images(class_dir, label, roots) if class_dir.is_dir() else []
        if not images:
            raise DatasetError(
                f"class {name!r} has no images in {split_dir}; every class needs images in "
                "every split"
            )
        files += images
    return files


def _layout_classes(directory: Path) -> tuple[tuple[str, ...], Path, Path | None]:
    """(class names, the train folder, the test folder or None)."""
    present = {name for name in SPLIT_DIRS if (directory / name).is_dir()}
    if present == set(SPLIT_DIRS):
        train_dir, test_dir = directory / "train", directory / "test"
        train_classes = [entry.name for entry in _class_dirs(train_dir)]
        test_classes = [entry.name for entry in _class_dirs(test_dir)]
        if train_classes != test_classes:
            only_train = sorted(set(train_classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(train_classes))
            raise DatasetError(
                f"{directory}: train and test name different classes (only in train: "
                f"{only_train}, only in test: {only_test})"
            )
        return tuple(train_classes), train_dir, test_dir
    if present:
        (only,) = present
        missing = "test" if only == "train" else "train"
        raise DatasetError(
            f"{directory} has a {only!r} folder but no {missing!r} folder: give both "
            f"({directory}/train/<class>/..., {directory}/test/<class>/...), or put the class "
            "folders directly in it and let liptune carve the test split"
        )
    return tuple(entry.name for entry in _class_dirs(directory)), directory, None


def _colour(image: Image.Image) -> bool:
    if image.mode in _GREY_MODES:
        return False
    if image.mode in ("P", "PA"):
        palette = image.getpalette() or []
        triples = zip(palette[0::3], palette[1::3], palette[2::3], strict=False)
        return any(r != g or g != b for r, g, b in triples)
    return True


def _header(path: Path) -> tuple[tuple[int, int], bool]:
    """((height, width), in colour) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return (image.height, image.width), _colour(image)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DatasetError(f"{path} is not an image Pillow can read: {error}") from None


def inspect_folder(
    directory: Path, roots: Sequence[Path], size: Sequence[int] | None = None
) -> FolderLayout:
    """The layout of the image folder ``directory`` (already checked to lie in ``roots``).

    Raises :class:`DatasetError` naming the folder or the file: a ``train`` folder without a
    ``test`` one (or the reverse), fewer than two classes, a class without images, classes that
    differ between the splits, a file that is not an image, images of different sizes when
    ``size`` is not given (the first one that differs from the first image).
    """
    class_names, train_dir, test_dir = _layout_classes(directory)
    if len(class_names) < 2:
        raise DatasetError(
            f"{directory} holds {len(class_names)} class folder(s) "
            f"({', '.join(class_names) or 'none'}); a classifier needs at least two "
            "(one sub-folder of images per class)"
        )
    train = _split(train_dir, class_names, roots)
    test = _split(test_dir, class_names, roots) if test_dir is not None else None
    first_shape: tuple[int, int] | None = None
    first_path: Path | None = None
    colour = False
    for item in (*train, *(test or ())):
        shape, in_colour = _header(item.path)
        colour |= in_colour
        if first_shape is None:
            first_shape, first_path = shape, item.path
        elif size is None and shape != first_shape:
            raise DatasetError(
                f"{item.path} is {shape[1]}x{shape[0]} (width x height) but {first_path} is "
                f"{first_shape[1]}x{first_shape[0]}: give every image one size, or set "
                "dataset.size = [H, W] to resize them all"
            )
    assert first_shape is not None  # every class has an image
    height, width = (int(size[0]), int(size[1])) if size is not None else first_shape
    return FolderLayout(
        directory=directory,
        class_names=class_names,
        train=tuple(train),
        test=None if test is None else tuple(test),
        input_shape=(3 if colour else 1, height, width),
    )


def _decode(item: ImageFile, channels: int, height: int, width: int) -> np.ndarray:
    try:
        with Image.open(item.path) as opened:
            image = opened.convert("RGB" if channels == 3 else "L")
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DatasetError(f"{item.path} could not be decoded: {error}") from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def decode_images(
    items: Sequence[ImageFile], input_shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8`` (N, C, H, W) and labels int64 (N,), decoded once each.

    A file that only decoding shows to be broken (truncated, corrupt) raises
    :class:`DatasetError` naming it.
    """
    channels, height, width = input_shape
    images = np.empty((len(items), channels, height, width), dtype=np.uint8)
    for index, item in enumerate(items):
        images[index] = _decode(item, channels, height, width)
    labels = np.fromiter((item.label for item in items), dtype=np.int64, count=len(items))
    return images, labels


def read_folder(
    layout: FolderLayout,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(x_train, y_train, x_test, y_test)`` (test ``None`` in the one-level layout)."""
    x_train, y_train = decode_images(layout.train, layout.input_shape)
    if layout.test is None:
        return x_train, y_train, None, None
    x_test, y_test = decode_images(layout.test, layout.input_shape)
    return x_train, y_train, x_test, y_test
