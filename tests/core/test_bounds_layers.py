"""The core's layers against the exact dense norm: no configuration above 1."""

import itertools

import pytest
import torch
from torch import nn

from liptune.bounds import lipschitz_bound
from liptune.nn import SpectralConv2d, SpectralLinear
from tests.core.test_bounds import dense_norm

CONFIGS = [
    (k, s, p, mode, bjorck)
    for k, s, p, mode, bjorck in itertools.product(
        (1, 2, 3), (1, 2, 3), (0, 1, "same"), ("zeros", "circular"), (0, 15)
    )
    if not (p == "same" and s != 1) and not (mode == "circular" and p != "same" and 2 * p > k - 1)
]


def trained(layer: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    optimizer = torch.optim.Adam(layer.parameters(), lr=3e-2)
    for _ in range(5):
        optimizer.zero_grad()
        layer(torch.rand(4, *shape)).square().mean().neg().backward()
        optimizer.step()
    return layer.eval()


@pytest.mark.parametrize(("kernel", "stride", "padding", "mode", "bjorck"), CONFIGS)
def test_spectral_conv_exact_norm_is_at_most_one(kernel, stride, padding, mode, bjorck):
    torch.manual_seed(kernel + 7 * stride)
    conv = SpectralConv2d(
        3, 4, kernel, stride=stride, padding=padding, padding_mode=mode, bjorck_iterations=bjorck
    )
    shape = (3, 6, 6)
    trained(conv, shape)
    assert dense_norm(nn.Sequential(conv), shape) <= 1.0 + 1e-5
    assert lipschitz_bound(conv, shape) <= 1.0 + 1e-5


def test_circular_padding_wider_than_the_half_kernel_is_refused():
    with pytest.raises(ValueError, match="circular padding 2 along the height"):
        SpectralConv2d(2, 2, 3, padding=2, padding_mode="circular")


def test_spectral_normalisation_only_survives_an_overwrite():
    torch.manual_seed(0)
    layer = SpectralLinear(16, 16, bjorck_iterations=0)
    trained(layer, (16,)).train()
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.randn(16, 16) * 16)
    layer.eval()
    assert torch.linalg.matrix_norm(layer.weight.double(), 2).item() <= 1.0 + 1e-6


def test_the_eval_cache_follows_edits_through_data():
    torch.manual_seed(0)
    layer = SpectralLinear(8, 8, bjorck_iterations=0).eval()
    before = layer.weight.clone()
    layer.parametrizations.weight.original.data.copy_(torch.randn(8, 8) * 5)
    after = layer.weight
    assert not torch.equal(before, after)
    assert torch.linalg.matrix_norm(after.double(), 2).item() <= 1.0 + 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_constrained_in_float32(dtype):
    torch.manual_seed(0)
    layer = SpectralLinear(64, 64).to(dtype).eval()
    wide = SpectralLinear(64, 64).eval()
    wide.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    # The half weight is the float32 constraint rounded once, not a half-precision Björck.
    assert torch.equal(layer.weight, wide.weight.to(dtype))
    norm = torch.linalg.matrix_norm(layer.weight.double(), 2).item()
    assert norm <= 1.0 + (1e-2 if dtype == torch.bfloat16 else 2e-3)
