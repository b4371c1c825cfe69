"""A user's own data: image folders (ImageFolder layout) and Keras-layout ``.npz`` arrays.

Every file is made here with Pillow and numpy. The independent truth is the pixels the test
wrote: decoded images must be exactly those values (PNG) or within JPEG's loss, scaled to
[0, 1], in the channel layout the folder's modes call for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from worker.spec import DatasetSpec
from worker.trial.datasets import (
    DatasetError,
    clear_cache,
    clear_descriptions,
    describe_dataset,
    load_dataset,
)
from worker.trial.datasets import _folder as folder_module


@pytest.fixture(autouse=True)
def _fresh_caches():
    clear_cache()
    clear_descriptions()
    yield
    clear_cache()
    clear_descriptions()


def grey(value: int, size=(6, 5)) -> Image.Image:
    """A (height, width) = size grey image whose pixel (r, c) is value + r + c."""
    rows, cols = np.indices(size)
    return Image.fromarray((value + rows + cols).astype(np.uint8), mode="L")


def write_folder(
    root: Path, classes: dict[str, list[Image.Image]], suffix: str = ".png"
) -> list[Path]:
    written = []
    for name, images in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            path = root / name / f"{index:03d}{suffix}"
            image.save(path)
            written.append(path)
    return written


def spec(name: str, path: str, **fields) -> DatasetSpec:
    return DatasetSpec(name=name, path=path, validation_fraction=0.0, **fields)


def test_a_grey_folder_with_its_own_test_split_decodes_to_the_pixels_written(tmp_path: Path):
    write_folder(tmp_path / "shapes/train", {"cat": [grey(10), grey(20)], "dog": [grey(30)]})
    write_folder(tmp_path / "shapes/test", {"cat": [grey(40)], "dog": [grey(50), grey(60)]})
    splits = load_dataset(spec("folder", "shapes"), data_roots=[tmp_path], seed=0)
    assert splits.class_names == ("cat", "dog") and splits.task == "binary"
    assert splits.input_shape == (1, 6, 5)
    assert splits.train.x.shape == (3, 1, 6, 5) and splits.test.x.shape == (3, 1, 6, 5)
    expected = {v: (v + np.add.outer(np.arange(6), np.arange(5))) / 255.0 for v in range(0, 70, 10)}
    test = {round(float(x[0, 0, 0]) * 255): (x, y) for x, y in zip(*splits.test, strict=True)}
    assert sorted(test) == [40, 50, 60]
    for value, (x, y) in test.items():
        np.testing.assert_allclose(x[0].numpy(), expected[value], atol=1e-7)
        assert int(y) == (0 if value == 40 else 1)


def test_one_colour_image_makes_the_whole_folder_rgb_and_alpha_is_dropped(tmp_path: Path):
    rgba = Image.new("RGBA", (5, 6), (200, 100, 50, 7))
    palette = Image.new("P", (5, 6))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    write_folder(tmp_path / "mixed", {"a": [grey(5), rgba], "b": [palette, grey(9).convert("LA")]})
    Image.new("RGB", (5, 6), (1, 2, 3)).save(tmp_path / "mixed/b/photo.jpg", quality=100)
    described = describe_dataset(spec("folder", "mixed"), [tmp_path])
    assert described.input_shape == (3, 6, 5) and described.all_class_names == ("a", "b")
    splits = load_dataset(spec("folder", "mixed"), data_roots=[tmp_path], seed=0)
    images = torch.cat([splits.train.x, splits.test.x])
    assert images.shape == (5, 3, 6, 5)
    colours = {tuple(np.round(x[:, 2, 2].numpy() * 255).astype(int)) for x in images}
    assert (200, 100, 50) in colours  # RGBA without its alpha
    assert (9 + 4, 9 + 4, 9 + 4) in colours  # grey with alpha: the same value on R, G and B
    grey_pixel = images[
        [bool((x[0] == x[1]).all() and (x[0, 0, 0] * 255).round() == 5) for x in images]
    ]
    assert len(grey_pixel) == 1


def test_the_grey_palette_keeps_a_folder_grey(tmp_path: Path):
    palette = Image.new("P", (5, 6))
    palette.putpalette([value for level in range(256) for value in (level, level, level)])
    write_folder(tmp_path / "g", {"a": [grey(1), palette], "b": [grey(2)]})
    assert describe_dataset(spec("folder", "g"), [tmp_path]).input_shape == (1, 6, 5)


def test_sizes_that_differ_are_refused_naming_the_file_unless_resized(tmp_path: Path):
    write_folder(tmp_path / "sizes", {"a": [grey(1), grey(2, size=(7, 5))], "b": [grey(3)]})
    with pytest.raises(DatasetError, match=r"a/001\.png is 5x7 .*/000\.png is 5x6.*dataset\.size"):
        describe_dataset(spec("folder", "sizes"), [tmp_path])
    splits = load_dataset(spec("folder", "sizes", size=(4, 3)), data_roots=[tmp_path], seed=0)
    assert splits.input_shape == (1, 4, 3) and splits.train.x.shape[1:] == (1, 4, 3)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda root: write_folder(root / "train", {"a": [grey(1)], "b": [grey(2)]}),
            "has a 'train' folder but no 'test' folder",
        ),
        (
            lambda root: write_folder(root, {"only": [grey(1), grey(2)]}),
            "a classifier needs at least two",
        ),
        (
            lambda root: (
                write_folder(root / "train", {"a": [grey(1)], "b": [grey(2)]}),
                write_folder(root / "test", {"a": [grey(1)], "c": [grey(2)]}),
            ),
            r"only in train: \['b'\], only in test: \['c'\]",
        ),
        (
            lambda root: (write_folder(root, {"a": [grey(1)]}), (root / "b").mkdir()),
            "class 'b' has no images",
        ),
        (
            lambda root: (
                write_folder(root, {"a": [grey(1)], "b": [grey(2)]}),
                (root / "b/broken.png").write_bytes(b"not an image"),
            ),
            r"b/broken\.png is not an image",
        ),
    ],
    ids=["missing-split", "one-class", "classes-differ", "empty-class", "not-an-image"],
)
def test_layouts_that_cannot_run_are_refused_from_the_headers(tmp_path: Path, make, message):
    make(tmp_path / "data")
    with pytest.raises(DatasetError, match=message):
        describe_dataset(spec("folder", "data"), [tmp_path])


def test_a_truncated_image_fails_at_decoding_naming_the_file(tmp_path: Path):
    paths = write_folder(
        tmp_path / "t", {"a": [grey(1, size=(64, 64))], "b": [grey(2, size=(64, 64))]}
    )
    content = paths[1].read_bytes()
    paths[1].write_bytes(content[: len(content) // 2])
    describe_dataset(spec("folder", "t"), [tmp_path])  # the header is intact
    with pytest.raises(DatasetError, match=r"b/000\.png could not be decoded"):
        load_dataset(spec("folder", "t"), data_roots=[tmp_path], seed=0)


def test_a_folder_is_decoded_once_and_its_trials_reuse_it(tmp_path: Path, monkeypatch):
    write_folder(tmp_path / "once", {"a": [grey(1), grey(2)], "b": [grey(3), grey(4)]})
    decoded = []
    real = folder_module._decode
    monkeypatch.setattr(
        folder_module, "_decode", lambda item, *a: decoded.append(item) or real(item, *a)
    )
    first = load_dataset(spec("folder", "once"), data_roots=[tmp_path], seed=0)
    assert len(decoded) == 4
    second = load_dataset(spec("folder", "once"), data_roots=[tmp_path], seed=1)  # another trial
    assert len(decoded) == 4 and second is not first
    write_folder(tmp_path / "once", {"b": [grey(3), grey(4), grey(5)]})  # a new image
    load_dataset(spec("folder", "once"), data_roots=[tmp_path], seed=0)
    assert len(decoded) == 4 + 5


def test_classes_by_name_select_and_relabel(tmp_path: Path):
    write_folder(tmp_path / "n", {"ant": [grey(1)] * 3, "bee": [grey(2)] * 3, "cow": [grey(3)] * 3})
    splits = load_dataset(
        spec("folder", "n", classes=["cow", "ant"]), data_roots=[tmp_path], seed=0
    )
    assert splits.class_names == ("cow", "ant") and splits.task == "binary"
    labels = torch.cat([splits.train.y, splits.test.y])
    values = torch.cat([splits.train.x, splits.test.x])[:, 0, 0, 0] * 255
    assert set(zip(labels.tolist(), values.round().int().tolist(), strict=True)) == {(0, 3), (1, 1)}
    with pytest.raises(DatasetError, match=r"classes \['bird'\] do not exist") as error:
        describe_dataset(spec("folder", "n", classes=["bird", "ant"]), [tmp_path])
    assert error.value.field == "classes"


def test_a_symlink_out_of_the_data_roots_is_refused(tmp_path: Path):
    outside = tmp_path / "outside"
    write_folder(outside, {"x": [grey(1)]})
    root = tmp_path / "root"
    write_folder(root / "d", {"a": [grey(1)]})
    (root / "d" / "x").symlink_to(outside / "x")
    with pytest.raises(DatasetError, match="leaves the data roots"):
        describe_dataset(spec("folder", "d"), [root])
    with pytest.raises(DatasetError, match="outside the data roots"):
        describe_dataset(spec("folder", str(outside)), [root])


# --------------------------------------------------------------------------- .npz


def keras_arrays(n=40, shape=(6, 5), classes=3, dtype=np.uint8, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def images(count):
        values = rng.integers(0, 256, size=(count, *shape))
        return values.astype(dtype) if dtype == np.uint8 else (values / 255).astype(dtype)

    return {
        "x_train": images(n),
        "y_train": np.arange(n) % classes,
        "x_test": images(n // 2),
        "y_test": np.arange(n // 2) % classes,
    }


@pytest.mark.parametrize(
    ("shape", "layout", "expected"),
    [
        ((6, 5), None, (1, 6, 5)),
        ((6, 5, 3), None, (3, 6, 5)),
        ((3, 6, 5), None, (3, 6, 5)),
        ((6, 5, 4), None, (3, 6, 5)),  # RGBA: alpha dropped
        ((3, 6, 3), "nchw", (3, 6, 3)),
        ((3, 6, 3), "nhwc", (3, 3, 6)),
        ((7,), None, (7,)),
    ],
)
def test_npz_layouts_become_channels_first(tmp_path: Path, shape, layout, expected):
    arrays = keras_arrays(shape=shape)
    np.savez_compressed(tmp_path / "data.npz", **arrays)
    splits = load_dataset(spec("npz", "data.npz", layout=layout), data_roots=[tmp_path], seed=0)
    assert splits.input_shape == expected and splits.num_classes == 3
    x_test = arrays["x_test"].astype(np.float64) / 255
    if len(shape) == 3 and (layout == "nhwc" or (layout is None and shape[-1] in (3, 4))):
        x_test = x_test.transpose(0, 3, 1, 2)[:, :3]
    elif len(shape) == 2:
        x_test = x_test[:, None]
    np.testing.assert_allclose(splits.test.x.numpy(), x_test, atol=1e-7)


def test_float_npz_in_the_unit_range_and_class_names(tmp_path: Path):
    arrays = keras_arrays(dtype=np.float32) | {"class_names": np.array(["r", "g", "b"])}
    np.savez(tmp_path / "f.npz", **arrays)
    splits = load_dataset(spec("npz", "f.npz"), data_roots=[tmp_path], seed=0)
    assert splits.class_names == ("r", "g", "b")
    np.testing.assert_allclose(splits.test.x[:, 0].numpy(), arrays["x_test"], atol=1e-7)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x_test": None}, "has no array 'x_test'"),
        ({"y_train": np.zeros(39, dtype=np.int64)}, "x_train has 40 examples but y_train has 39"),
        (
            {"y_train": np.zeros(40, dtype=np.int64), "y_test": np.zeros(20, dtype=np.int64)},
            "one class",
        ),
        ({"y_train": np.arange(40) % 3 * 2}, r"no examples of classes \[1, 3\]"),
        ({"y_test": np.full(20, -1)}, "labels are 0..K-1"),
        ({"y_train": np.arange(40) % 3 + 0.5}, "must be integers"),
        (
            {
                "x_train": np.full((40, 6, 5), 1.5, dtype=np.float32),
                "x_test": np.zeros((20, 6, 5), dtype=np.float32),
            },
            r"float images must lie in \[0, 1\]",
        ),
        (
            {
                "x_train": np.zeros((40, 3, 6, 3), dtype=np.uint8),
                "x_test": np.zeros((20, 3, 6, 3), dtype=np.uint8),
            },
            "set dataset.layout",
        ),
        ({"x_test": np.zeros((20, 5, 6), dtype=np.uint8)}, "x_test's are"),
        ({"x_train": np.zeros((40, 6, 5), dtype=np.int32)}, "neither uint8"),
    ],
    ids=[
        "missing",
        "lengths",
        "one-class",
        "gaps",
        "negative",
        "float-labels",
        "range",
        "ambiguous",
        "shapes",
        "dtype",
    ],
)
def test_npz_that_cannot_run_is_refused_naming_the_file(tmp_path: Path, change, message):
    arrays = {key: value for key, value in (keras_arrays() | change).items() if value is not None}
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=message) as error:
        describe_dataset(spec("npz", "bad.npz"), [tmp_path])
    assert "bad.npz" in str(error.value)


def test_a_pickle_in_an_npz_is_refused_never_loaded(tmp_path: Path):
    arrays = keras_arrays()
    arrays["y_train"] = np.array([object()] * 40, dtype=object)
    np.savez(tmp_path / "pickle.npz", **arrays)
    with pytest.raises(DatasetError, match="object array"):
        describe_dataset(spec("npz", "pickle.npz"), [tmp_path])
    (tmp_path / "zip.npz").write_bytes(b"PK not a zip")
    with pytest.raises(DatasetError, match=r"not an \.npz file"):
        describe_dataset(spec("npz", "zip.npz"), [tmp_path])
