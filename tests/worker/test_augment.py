"""Training augmentation (worker.trial._augment): per-image random crops and flips drawn on the
batch's device, refused for data that are not images, and absent from every evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.spec import AugmentSpec, TrainingSpec
from worker.trial._augment import (
    augmentation_error,
    build_augmentation,
    random_crop,
    random_horizontal_flip,
)


def images(n: int = 6, channels: int = 3, size: int = 8) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("padding", [1, 2, 4])
def test_each_image_is_a_window_of_its_zero_padded_self(padding):
    x = images()
    out = random_crop(x, padding, torch.Generator().manual_seed(3))
    offsets = torch.randint(
        0, 2 * padding + 1, (2, len(x), 1), generator=torch.Generator().manual_seed(3)
    )
    padded = F.pad(x, (padding,) * 4)
    assert out.shape == x.shape
    for i in range(len(x)):
        top, left = int(offsets[0, i]), int(offsets[1, i])
        torch.testing.assert_close(out[i], padded[i, :, top : top + 8, left : left + 8])
    # the offsets differ between images, and every offset in [0, 2p] can be drawn
    many = torch.randint(
        0, 2 * padding + 1, (2, 4000, 1), generator=torch.Generator().manual_seed(0)
    )
    assert set(many.unique().tolist()) == set(range(2 * padding + 1))


def test_flips_mirror_about_half_the_images_and_leave_the_others():
    x = images(n=400, channels=1)
    out = random_horizontal_flip(x, torch.Generator().manual_seed(5))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert 150 < int(flipped.sum()) < 250


def test_the_same_generator_seed_gives_the_same_batch():
    augment = build_augmentation(AugmentSpec(random_crop=2, horizontal_flip=True), (3, 8, 8))
    x = images()
    first = augment(x, torch.Generator().manual_seed(7))
    again = augment(x, torch.Generator().manual_seed(7))
    other = augment(x, torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert x.min() >= 0 and first.max() <= x.max()  # zero padding stays in [0, 1]


def test_augmentation_is_off_by_default_and_when_empty():
    assert TrainingSpec().augment is None
    assert build_augmentation(None, (2,)) is None
    assert build_augmentation(AugmentSpec(), (2,)) is None


def test_augmentation_needs_images_and_a_crop_inside_them():
    spec = AugmentSpec(random_crop=4, horizontal_flip=True)
    assert augmentation_error(spec, (1, 8, 8)) is None
    assert "shape (2,)" in augmentation_error(spec, (2,))
    assert "below the images' height and width (8x8)" in augmentation_error(
        AugmentSpec(random_crop=8), (1, 8, 8)
    )
    with pytest.raises(ValueError, match=r"^training\.augment: augmentation needs images"):
        build_augmentation(spec, (2,))


def test_augmentation_runs_on_the_meta_device():
    """Shapes only, no values: the draws and gathers are device operations."""
    augment = build_augmentation(AugmentSpec(random_crop=4, horizontal_flip=True), (3, 32, 32))
    out = augment(torch.empty(5, 3, 32, 32, device="meta"), None)
    assert out.is_meta and out.shape == (5, 3, 32, 32)
