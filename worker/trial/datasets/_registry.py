"""The data sets liptune knows, by name, and where each one's files are looked for.

One registry, :data:`DATASETS`, holds every entry: the bundled, synthetic and file-based sets
liptune ships, the two readers of a user's own files (``folder``: an image folder, ``npz``: Keras
arrays), and the sets installed plugins bring. A plugin is a package that declares an entry point
in the group ``liptune.datasets``::

    [project.entry-points."liptune.datasets"]
    my-set = "my_package.data:load"

where ``load()`` returns a mapping of the arrays ``x_train``, ``y_train``, ``x_test``,
``y_test`` (optionally ``class_names``), held to the checks of :mod:`worker.trial.datasets._arrays`,
or the entry point names a :class:`DatasetInfo` itself. Plugins are read once per process, the
first time the registry is asked; :func:`register_dataset` adds an entry from Python code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from worker.common._plugins import EntryPoints
from worker.trial.datasets._cifar import cifar_files
from worker.trial.datasets._errors import DatasetError
from worker.trial.datasets._idx import IDX_STEMS, idx_files
from worker.trial.datasets._locate import find_default_dir, resolve_user_path, resolved_roots

#: The entry-point group of data-set plugins.
ENTRY_POINT_GROUP = "liptune.datasets"
Kind = Literal["bundled", "synthetic", "files", "folder", "npz", "plugin"]
#: Kinds whose shape and classes are known only from the user's files or the plugin's arrays.
USER_KINDS = ("folder", "npz", "plugin")


@dataclass(frozen=True)
class DatasetInfo:
    """What the registry knows about a data set before loading it.

    ``kind`` is ``"bundled"`` (shipped with a Python package), ``"synthetic"`` (generated),
    ``"files"`` (read from a directory under a data root: ``dir_names`` are looked for under each
    root when the spec gives no ``path``), ``"folder"`` / ``"npz"`` (the user's own image folder or
    array file named by ``dataset.path``) or ``"plugin"`` (arrays returned by ``loader``).
    ``install_hint`` says how to make a missing one available. ``train_examples`` is the size of
    the training pool (train + validation) before any subsampling, for memory estimates
    (synthetic sets: ``n_samples`` decides). For the user kinds the shape fields are empty: the
    files or the plugin's arrays say them (:func:`worker.trial.datasets.describe_dataset`).
    """

    name: str
    description: str
    task: Literal["binary", "multiclass"]
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...]
    kind: Kind
    file_format: Literal["idx", "cifar"] | None = None
    dir_names: tuple[str, ...] = ()
    install_hint: str = ""
    train_examples: int = 0
    loader: Callable[[], Mapping[str, np.ndarray]] | None = None
    source: str = "liptune"

    def locate(self, data_roots: Sequence[Path], path: str | None = None) -> dict[str, Path]:
        """The data set's files (role -> resolved path), all inside ``data_roots``.

        Empty for bundled, synthetic and plugin sets; ``{"folder": dir}`` or ``{"npz": file}``
        for a user's own data. Raises :class:`DatasetError` saying what to install or which path
        to set when the files are not there.
        """
        if self.kind in ("folder", "npz"):
            if not path:
                raise DatasetError(
                    f"data set {self.name!r} reads your own "
                    f"{'image folder' if self.kind == 'folder' else '.npz file'}: name it with "
                    "dataset.path, relative to a data root"
                )
            want = "dir" if self.kind == "folder" else "file"
            return {self.kind: resolve_user_path(path, resolved_roots(data_roots), want)}
        if self.kind != "files":
            return {}
        roots = resolved_roots(data_roots)
        directory = (
            resolve_user_path(path, roots, "dir")
            if path
            else find_default_dir(self.dir_names, roots)
        )
        files = None
        if directory is not None:
            finder = idx_files if self.file_format == "idx" else cifar_files
            files = finder(directory, roots)
        if files is None:
            where = f"in {directory}" if directory else "under the data roots"
            roots_text = ", ".join(str(root) for root in roots) or "(none configured)"
            raise DatasetError(
                f"data set {self.name!r} not found {where} (data roots: {roots_text}). "
                f"{self.install_hint}"
            )
        return files

    def available(self, data_roots: Sequence[Path], path: str | None = None) -> bool:
        """Whether :meth:`locate` would find the data set."""
        try:
            self.locate(data_roots, path)
        except DatasetError:
            return False
        return True


_IDX_NAMES = ", ".join(f"{stems[0]}[.gz]" for stems in IDX_STEMS.values())
_DIGIT_NAMES = tuple(str(digit) for digit in range(10))

_FOLDER_DESCRIPTION = (
    "Your own image folder under a data root, in torchvision's ImageFolder layout: "
    "`path`/train/<class>/* and `path`/test/<class>/*, or `path`/<class>/* (a fixed test split "
    "is carved). Any format Pillow reads; RGB as soon as one image is in colour, else grey; one "
    "size for all, or `size: [H, W]` to resize. Classes are the folder names."
)
_NPZ_DESCRIPTION = (
    "Your own .npz file under a data root (`path`), in the layout of Keras's mnist.npz: "
    "x_train, y_train, x_test, y_test (optionally class_names). Images (N, H, W), (N, H, W, C) "
    "or (N, C, H, W) (`layout` where ambiguous) or vectors (N, D); uint8 in [0, 255] or floats "
    "in [0, 1]; integer labels 0..K-1."
)

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="digits",
            description="scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 "
            "classes): seconds to train, for tests and demos.",
            task="multiclass",
            input_shape=(1, 8, 8),
            num_classes=10,
            class_names=_DIGIT_NAMES,
            kind="bundled",
            train_examples=1797 - round(0.2 * 1797),
        ),
        DatasetInfo(
            name="fashion-mnist",
            description="Zalando's Fashion-MNIST: 28x28 grey clothing images, 60,000 train and "
            "10,000 test, 10 classes.",
            task="multiclass",
            input_shape=(1, 28, 28),
            num_classes=10,
            class_names=(
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ),
            kind="files",
            file_format="idx",
            dir_names=("fashion-mnist", "fashion_mnist", "FashionMNIST"),
            train_examples=60_000,
            install_hint="Install Debian's package `dataset-fashion-mnist` (it puts the IDX files "
            "in /usr/share/datasets/fashion-mnist), or put the four IDX files "
            f"({_IDX_NAMES}) in a directory `fashion-mnist` under a data root, or name their "
            "directory with `dataset.path` (add its parent with --data-root).",
        ),
        DatasetInfo(
            name="mnist",
            description="MNIST handwritten digits: 28x28 grey images, 60,000 train and 10,000 "
            "test, 10 classes.",
            task="multiclass",
            input_shape=(1, 28, 28),
            num_classes=10,
            class_names=_DIGIT_NAMES,
            kind="files",
            file_format="idx",
            dir_names=("mnist", "MNIST"),
            train_examples=60_000,
            install_hint=f"Put MNIST's four IDX files ({_IDX_NAMES}) in a directory `mnist` "
            "under a data root (e.g. LIPTUNE_HOME/datasets/mnist), or name their directory "
            "with `dataset.path` (add its parent with --data-root).",
        ),
        DatasetInfo(
            name="cifar10",
            description="CIFAR-10: 32x32 colour images, 50,000 train and 10,000 test, 10 classes "
            "(python-pickle batches).",
            task="multiclass",
            input_shape=(3, 32, 32),
            num_classes=10,
            class_names=(
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ),
            kind="files",
            file_format="cifar",
            dir_names=("cifar-10-batches-py", "cifar10"),
            train_examples=50_000,
            install_hint="Unpack cifar-10-python.tar.gz (data_batch_1..5, test_batch) into a "
            "directory `cifar-10-batches-py` under a data root (e.g. "
            "LIPTUNE_HOME/datasets/cifar-10-batches-py), or name it with `dataset.path` (add its "
            "parent with --data-root).",
        ),
        DatasetInfo(
            name="two-moons",
            description="Two interleaving half circles in the plane (binary, generated; "
            "`n_samples` points, Gaussian `noise`).",
            task="binary",
            input_shape=(2,),
            num_classes=2,
            class_names=("upper moon", "lower moon"),
            kind="synthetic",
        ),
        DatasetInfo(
            name="snowflake",
            description="Inside vs outside the Von Koch snowflake, a fractal boundary (binary, "
            "generated; uniform points of a square around it).",
            task="binary",
            input_shape=(2,),
            num_classes=2,
            class_names=("outside", "inside"),
            kind="synthetic",
        ),
        DatasetInfo(
            name="spheres",
            description="Two concentric spheres in the plane, radii 1 and 0.5 (binary, generated).",
            task="binary",
            input_shape=(2,),
            num_classes=2,
            class_names=("outer sphere", "inner sphere"),
            kind="synthetic",
        ),
        DatasetInfo(
            name="folder",
            description=_FOLDER_DESCRIPTION,
            task="multiclass",
            input_shape=(),
            num_classes=0,
            class_names=(),
            kind="folder",
        ),
        DatasetInfo(
            name="npz",
            description=_NPZ_DESCRIPTION,
            task="multiclass",
            input_shape=(),
            num_classes=0,
            class_names=(),
            kind="npz",
        ),
    )
}


def register_dataset(info: DatasetInfo) -> None:
    """Add ``info`` to the registry; a name that is taken raises ``ValueError``."""
    _PLUGINS.load()
    _register(info)


def _register(info: DatasetInfo) -> None:
    if info.name in DATASETS:
        raise ValueError(f"data set {info.name!r} is registered already ({info.source})")
    if info.kind == "plugin" and info.loader is None:
        raise ValueError(f"data set {info.name!r}: a plugin data set needs a loader")
    DATASETS[info.name] = info


def plugin_info(
    name: str, loader: Callable[[], Mapping[str, np.ndarray]], source: str
) -> DatasetInfo:
    """The registry entry of a plugin's loader: its docstring describes it; the shapes are read
    from its arrays when first described."""
    doc = (getattr(loader, "__doc__", None) or "").strip()
    return DatasetInfo(
        name=name,
        description=doc.split("\n\n")[0].replace("\n", " ") or f"Data set from {source}.",
        task="multiclass",
        input_shape=(),
        num_classes=0,
        class_names=(),
        kind="plugin",
        loader=loader,
        source=source,
    )


def _register_entry(name: str, loaded: object, source: str) -> None:
    if isinstance(loaded, DatasetInfo):
        _register(loaded)
    elif callable(loaded):
        _register(plugin_info(name, loaded, source))
    else:
        raise TypeError(f"{type(loaded).__name__} is neither callable nor a DatasetInfo")


_PLUGINS = EntryPoints(ENTRY_POINT_GROUP, "data-set plugin", _register_entry)


def registered_datasets() -> dict[str, DatasetInfo]:
    """Every registry entry, plugins included, by name."""
    _PLUGINS.load()
    return dict(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name``; :class:`DatasetError` lists the known names otherwise."""
    _PLUGINS.load()
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(
            f"unknown data set {name!r}; known: {sorted(DATASETS)} (a plugin's data set needs "
            "its package installed where the API and the workers run)"
        ) from None
