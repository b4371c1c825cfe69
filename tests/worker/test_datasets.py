"""Data set registry and loaders: every format, class selection, splits, the data-root fence."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.common._paths import SYSTEM_DATA_ROOT
from worker.spec import DatasetSpec
from worker.trial.datasets import DATASETS, DatasetError, clear_cache, load_dataset
from worker.trial.datasets._cifar import read_batch, write_cifar_dataset
from worker.trial.datasets._synthetic import inside_polygon, koch_snowflake

FASHION_DIR = SYSTEM_DATA_ROOT / "fashion-mnist"


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_tiny_mnist(directory: Path, compress: bool) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True)
    arrays = (
        rng.integers(0, 256, size=(50, 28, 28)),
        np.arange(50) % 10,
        rng.integers(0, 256, size=(20, 28, 28)),
        np.arange(20) % 10,
    )
    names = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    for name, array in zip(names, arrays, strict=True):
        write_idx(directory / name, array, compress)
    return arrays


def write_tiny_cifar(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    directory.mkdir(parents=True)
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(6, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=6)]
        with (directory / name).open("wb") as stream:
            pickle.dump({b"data": data, b"labels": labels}, stream)
        batches.append((data, labels))
    return batches[-1]


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


@pytest.mark.parametrize("name", ["two-moons", "snowflake", "spheres"])
def test_synthetic_sets_are_binary_in_unit_square_and_deterministic(name):
    spec = DatasetSpec(name=name, n_samples=500)
    splits = load_dataset(spec, data_roots=[], seed=3)
    assert splits.task == "binary" and splits.num_classes == 2
    assert splits.input_shape == (2,)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 500
    for split in (splits.train, splits.val, splits.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape[1:] == (2,)
        assert split.x.min() >= 0.0 and split.x.max() <= 1.0
    assert set(splits.train.y.tolist()) == {0, 1}
    clear_cache()
    again = load_dataset(spec, data_roots=[], seed=3)
    assert torch.equal(again.train.x, splits.train.x)
    assert torch.equal(again.val.y, splits.val.y)
    other_seed = load_dataset(spec, data_roots=[], seed=4)
    assert torch.equal(other_seed.test.x, splits.test.x), "the test split must not move"
    assert not torch.equal(other_seed.val.x, splits.val.x)


def test_snowflake_labels_follow_the_fractal_boundary():
    vertices = koch_snowflake(depth=2)
    assert len(vertices) == 3 * 4**2
    radii = np.linalg.norm(vertices, axis=1)
    assert radii.max() == pytest.approx(1.0)
    # The centre is inside; points beyond the circumscribed circle are outside; the snowflake's
    # area is 8/5 of its initial triangle's (exactly at infinite depth, close at depth 4).
    rng = np.random.default_rng(0)
    points = rng.uniform(-1.0, 1.0, size=(200_000, 2))
    inside = inside_polygon(points, koch_snowflake(depth=4))
    assert inside_polygon(np.array([[0.0, 0.0], [1.01, 0.0], [0.0, -1.01]]), vertices).tolist() == [
        True,
        False,
        False,
    ]
    triangle_area = 3 * np.sqrt(3) / 4
    assert inside.mean() * 4.0 == pytest.approx(8 / 5 * triangle_area, rel=0.02)


def test_digits_splits_scaled_and_cached():
    splits = load_dataset(DatasetSpec(name="digits"), data_roots=[], seed=0)
    assert splits.input_shape == (1, 8, 8) and splits.num_classes == 10
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert splits.train.x.shape[1:] == (1, 8, 8)
    assert float(splits.train.x.max()) == 1.0 and float(splits.train.x.min()) == 0.0
    assert len(splits.val) == round(0.1 * (len(splits.train) + len(splits.val)))
    assert load_dataset(DatasetSpec(name="digits"), data_roots=[], seed=0) is splits


def test_class_selection_relabels_in_the_given_order():
    splits = load_dataset(DatasetSpec(name="digits", classes=[8, 0]), data_roots=[], seed=0)
    assert splits.task == "binary" and splits.num_classes == 2
    assert splits.class_names == ("8", "0")
    full = load_dataset(DatasetSpec(name="digits"), data_roots=[], seed=0)
    assert len(splits.test) == int(((full.test.y == 0) | (full.test.y == 8)).sum())
    # Label 0 stands for the digit 8: the test images labelled 0 are the full set's 8s.
    eights = full.test.x[full.test.y == 8]
    assert torch.equal(splits.test.x[splits.test.y == 0], eights)
    three = load_dataset(DatasetSpec(name="digits", classes=[1, 2, 3]), data_roots=[], seed=0)
    assert three.task == "multiclass" and three.num_classes == 3
    assert set(three.train.y.tolist()) == {0, 1, 2}


def test_unknown_class_is_refused_with_the_valid_labels():
    with pytest.raises(DatasetError, match=r"classes \[12\].*0\.\.9"):
        load_dataset(DatasetSpec(name="digits", classes=[0, 12]), data_roots=[], seed=0)


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian's dataset-fashion-mnist missing")
def test_fashion_mnist_from_the_debian_package():
    assert DATASETS["fashion-mnist"].available([SYSTEM_DATA_ROOT])
    spec = DatasetSpec(name="fashion-mnist", classes=[0, 8], n_samples=1000)
    splits = load_dataset(spec, data_roots=[SYSTEM_DATA_ROOT], seed=0)
    assert splits.input_shape == (1, 28, 28)
    assert splits.class_names == ("T-shirt/top", "Bag")
    assert len(splits.train) + len(splits.val) == 1000
    assert len(splits.test) == 2000  # 1,000 test images per class
    assert splits.test.x.shape == (2000, 1, 28, 28)
    assert splits.test.x.min() >= 0.0 and splits.test.x.max() <= 1.0


@pytest.mark.parametrize("compress", [False, True])
def test_idx_reader_on_files_written_here(tmp_path, compress):
    x_train, y_train, x_test, y_test = write_tiny_mnist(tmp_path / "mnist", compress)
    assert DATASETS["mnist"].available([tmp_path])
    spec = DatasetSpec(name="mnist", validation_fraction=0.0)
    splits = load_dataset(spec, data_roots=[tmp_path], seed=0)
    assert len(splits.val) == 0
    np.testing.assert_allclose(splits.test.x[:, 0].numpy(), x_test / 255.0, rtol=1e-6)
    assert splits.test.y.tolist() == y_test.tolist()
    np.testing.assert_allclose(splits.train.x[:, 0].numpy(), x_train / 255.0, rtol=1e-6)
    # Any directory inside a data root can be named, here for Fashion-MNIST.
    named = DatasetSpec(name="fashion-mnist", path="mnist", validation_fraction=0.0)
    assert load_dataset(named, data_roots=[tmp_path], seed=0).train.y.tolist() == y_train.tolist()


def test_idx_reader_refuses_a_corrupt_file(tmp_path):
    write_tiny_mnist(tmp_path / "mnist", compress=False)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(b"\x08\x03nonsense")
    with pytest.raises(DatasetError, match="not an IDX file"):
        load_dataset(DatasetSpec(name="mnist"), data_roots=[tmp_path], seed=0)


def test_cifar_reader_on_pickles_written_here(tmp_path):
    test_data, test_labels = write_tiny_cifar(tmp_path / "cifar-10-batches-py")
    splits = load_dataset(DatasetSpec(name="cifar10"), data_roots=[tmp_path], seed=0)
    assert splits.input_shape == (3, 32, 32)
    assert len(splits.train) + len(splits.val) == 30
    assert splits.test.y.tolist() == test_labels
    # Rows hold the R, G, B planes one after the other.
    expected = test_data.reshape(-1, 3, 32, 32) / 255.0
    np.testing.assert_allclose(splits.test.x.numpy(), expected, rtol=1e-6)


def test_written_cifar_batches_load_as_cifar10_from_a_named_path(tmp_path):
    rng = np.random.default_rng(4)
    x_train = rng.integers(0, 256, size=(23, 3, 32, 32), dtype=np.uint8)
    y_train = rng.integers(0, 10, size=23)
    x_test = rng.integers(0, 256, size=(7, 3, 32, 32), dtype=np.uint8)
    y_test = rng.integers(0, 10, size=7)
    write_cifar_dataset(tmp_path / "generated", x_train, y_train, x_test, y_test)
    sizes = [len(read_batch(tmp_path / "generated" / f"data_batch_{i}")[1]) for i in range(1, 6)]
    assert sizes == [5, 5, 5, 4, 4]
    spec = DatasetSpec(name="cifar10", path="generated", validation_fraction=0.0)
    splits = load_dataset(spec, data_roots=[tmp_path], seed=0)
    assert splits.input_shape == (3, 32, 32) and len(splits.train) == 23
    assert splits.test.y.tolist() == y_test.tolist()
    np.testing.assert_allclose(splits.test.x.numpy(), x_test / 255.0, rtol=1e-6)
    with pytest.raises(ValueError, match=r"x_test must be uint8 of shape \(N, 3, 32, 32\)"):
        write_cifar_dataset(tmp_path / "bad", x_train, y_train, x_test[:, :1], y_test)


def test_cifar_reader_refuses_pickles_that_run_code(tmp_path):
    write_tiny_cifar(tmp_path / "cifar10")
    with (tmp_path / "cifar10" / "test_batch").open("wb") as stream:
        pickle.dump({b"data": Path("/etc/passwd"), b"labels": []}, stream)
    with pytest.raises(DatasetError, match="refusing to unpickle"):
        load_dataset(DatasetSpec(name="cifar10"), data_roots=[tmp_path], seed=0)


def test_paths_outside_the_data_roots_are_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    write_tiny_mnist(outside / "mnist", compress=True)
    for path in [str(outside / "mnist"), "../outside/mnist"]:
        with pytest.raises(DatasetError, match="outside the data roots"):
            load_dataset(DatasetSpec(name="mnist", path=path), data_roots=[root], seed=0)
    # A symlink planted in the root does not lead out either.
    (root / "mnist").symlink_to(outside / "mnist")
    assert not DATASETS["mnist"].available([root])
    with pytest.raises(DatasetError, match="outside the data roots"):
        load_dataset(DatasetSpec(name="mnist", path="mnist"), data_roots=[root], seed=0)
    # Nor does a symlinked file inside a real directory of the root.
    (root / "mnist").unlink()
    (root / "mnist").mkdir()
    for file in (outside / "mnist").iterdir():
        (root / "mnist" / file.name).symlink_to(file)
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(DatasetSpec(name="mnist"), data_roots=[root], seed=0)


def test_missing_data_set_says_what_to_do(tmp_path):
    with pytest.raises(DatasetError) as error:
        load_dataset(DatasetSpec(name="cifar10"), data_roots=[tmp_path], seed=0)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "cifar-10-batches-py" in message and "dataset.path" in message
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_dataset(DatasetSpec(name="fashion-mnist"), data_roots=[tmp_path], seed=0)
    with pytest.raises(DatasetError, match="not a directory under any data root"):
        load_dataset(DatasetSpec(name="mnist", path="nowhere"), data_roots=[tmp_path], seed=0)


def test_registry_describes_every_data_set():
    for name, info in DATASETS.items():
        assert info.name == name and info.description
        assert len(info.class_names) == info.num_classes
        if info.kind == "files":
            assert info.install_hint and info.dir_names
        elif info.kind in ("bundled", "synthetic"):
            assert info.available([])
        else:  # a user's own files: the spec's path names them
            assert info.kind in ("folder", "npz") and not info.available([])
