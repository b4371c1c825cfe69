"""The data sets liptune knows, by name, and where each one's files are looked for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from worker.datasets.cifar import cifar_files
from worker.datasets.errors import DatasetError
from worker.datasets.idx import IDX_STEMS, idx_files
from worker.datasets.locate import find_default_dir, resolve_user_dir, resolved_roots


@dataclass(frozen=True)
class DatasetInfo:
    """What the registry knows about a data set before loading it.

    ``kind`` is ``"bundled"`` (shipped with a Python package), ``"synthetic"`` (generated) or
    ``"files"`` (read from a directory under a data root: ``dir_names`` are looked for under each
    root when the spec gives no ``path``). ``install_hint`` says how to make a missing one
    available. ``train_examples`` is the size of the training pool (train + validation) before
    any subsampling, for memory estimates (synthetic sets: ``n_samples`` decides).
    """

    name: str
    description: str
    task: Literal["binary", "multiclass"]
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...]
    kind: Literal["bundled", "synthetic", "files"]
    file_format: Literal["idx", "cifar"] | None = None
    dir_names: tuple[str, ...] = ()
    install_hint: str = ""
    train_examples: int = 0

    def locate(self, data_roots: Sequence[Path], path: str | None = None) -> dict[str, Path]:
        """The data set's files (role -> resolved path), all inside ``data_roots``.

        Empty for bundled and synthetic sets. Raises :class:`DatasetError` saying what to
        install or which path to set when the files are not there.
        """
        if self.kind != "files":
            return {}
        roots = resolved_roots(data_roots)
        directory = (
            resolve_user_dir(path, roots) if path else find_default_dir(self.dir_names, roots)
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
    )
}


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name``; :class:`DatasetError` lists the known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(f"unknown data set {name!r}; known: {sorted(DATASETS)}") from None
