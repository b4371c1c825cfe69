"""Training augmentation of image batches, drawn on the trial's device.

A :class:`~worker.spec.AugmentSpec` becomes a function ``augment(x, generator) -> x'`` applied to
each training batch ``x`` (N, C, H, W) inside :func:`worker.trial._training.train_epoch`:
whole-batch tensor operations on the batch's device with random draws from the trial's generator of
that device, so there is no per-sample Python loop and no read back to the host (a step stays free
of synchronisation). Validation, test, certificates and every metric see the unaugmented images.

* ``random_crop = p``: each image is padded with p zero pixels on every side and cropped back to
  H x W at an offset drawn uniformly in [0, 2p] along each axis (torchvision's ``RandomCrop(H,
  padding=p)``, per image);
* ``horizontal_flip``: each image is mirrored left-right with probability 1/2.

The same spec, seed and device give the same draws (they come after the epoch's permutation from
the same generator).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from worker.spec import AugmentSpec

Augment = Callable[[Tensor, torch.Generator | None], Tensor]


def augmentation_error(spec: AugmentSpec | None, input_shape: Sequence[int]) -> str | None:
    """Why ``spec`` cannot augment inputs of ``input_shape`` (one example's), or ``None``:
    augmentation needs images (C, H, W), and a crop padding below their height and width."""
    if spec is None or not spec.active:
        return None
    shape = tuple(input_shape)
    if len(shape) != 3:
        return (
            f"augmentation needs images shaped (C, H, W); this data set's inputs have shape "
            f"{shape}: leave training.augment out"
        )
    _, height, width = shape
    if spec.random_crop >= min(height, width):
        return (
            f"random_crop {spec.random_crop} must be below the images' height and width "
            f"({height}x{width})"
        )
    return None


def build_augmentation(spec: AugmentSpec | None, input_shape: Sequence[int]) -> Augment | None:
    """The batch augmentation ``spec`` describes for inputs of ``input_shape``; ``None`` when it
    changes nothing. Raises ``ValueError`` naming ``training.augment`` when the inputs are not
    images (see :func:`augmentation_error`)."""
    error = augmentation_error(spec, input_shape)
    if error is not None:
        raise ValueError(f"training.augment: {error}")
    if spec is None or not spec.active:
        return None
    padding, flip = spec.random_crop, spec.horizontal_flip

    def augment(x: Tensor, generator: torch.Generator | None) -> Tensor:
        if padding:
            x = random_crop(x, padding, generator)
        if flip:
            x = random_horizontal_flip(x, generator)
        return x

    return augment


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Each image of ``x`` (N, C, H, W) zero-padded by ``padding`` on every side, then cropped
    back to (H, W) at its own offset in [0, 2 * padding]^2 (drawn with ``generator``, on the
    device of ``x``); two gathers, no loop over the images."""
    n, channels, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=generator, device=x.device)
    rows = offsets[0] + torch.arange(height, device=x.device)  # (N, H)
    cols = offsets[1] + torch.arange(width, device=x.device)  # (N, W)
    band = padded.gather(2, rows[:, None, :, None].expand(n, channels, height, width + 2 * padding))
    return band.gather(3, cols[:, None, None, :].expand(n, channels, height, width))


def random_horizontal_flip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Each image of ``x`` (N, C, H, W) mirrored left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
