"""The guaranteed bound against the exact norm of the dense operator (float64 SVD)."""

import itertools
import math

import pytest
import torch
from torch import nn

from liptune import certify
from liptune.bounds import (
    conv_bound,
    head_bound,
    layer_bounds,
    lipschitz_bound,
    lipschitz_estimate,
)
from liptune.export import vanilla_export
from liptune.nn import (
    FrobeniusLinear,
    GroupSort2,
    LipschitzSequential,
    SpectralConv2d,
    SpectralLinear,
)


def dense_norm(layer: nn.Module, shape: tuple[int, ...]) -> float:
    """Exact operator norm: the dense matrix of the bias-free layer on unit inputs, SVD."""
    layer = layer.double()
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        bias = layer(torch.zeros(1, *shape, dtype=torch.float64))
        columns = (layer(basis) - bias).reshape(n, -1)
    return torch.linalg.matrix_norm(columns, 2).item()


CONFIGS = [
    (k, s, mode, pad)
    for k, s, mode, pad in itertools.product(
        (1, 2, 3, 5, 7), (1, 2, 3), ("zeros", "circular", "reflect"), (0, 1, 3, "same")
    )
    if not (pad == "same" and s != 1)
]


@pytest.mark.parametrize(("kernel", "stride", "mode", "padding"), CONFIGS)
def test_conv_bound_is_never_below_the_exact_norm(kernel, stride, mode, padding):
    torch.manual_seed(kernel * 100 + stride * 10 + len(mode))
    conv = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, padding_mode=mode).double()
    shape = (3, 9, 8)
    exact = dense_norm(conv, shape)
    for dense in (False, True):
        bound, _ = conv_bound(conv, shape, dense=dense)
        assert bound >= exact * (1 - 1e-12)
    bound, method = conv_bound(conv, shape)
    assert method in ("dense", "circulant") and bound == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize(("kernel", "stride"), [(3, 1), (4, 2), (6, 3), (5, 1)])
def test_circulant_bound_is_exact_for_circular_padding(kernel, stride):
    torch.manual_seed(kernel)
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding="same" if stride == 1 else 0)
    conv = conv.double()
    conv.padding_mode = "circular"
    if stride != 1:
        conv.padding = ((kernel - stride) // 2, (kernel - stride) // 2)
        conv._reversed_padding_repeated_twice = [conv.padding[0]] * 4
    shape = (4, 12, 12)
    bound, _ = conv_bound(conv, shape, dense=False)
    exact = dense_norm(conv, shape)
    assert bound >= exact * (1 - 1e-12)
    if stride == 1 and kernel % 2:
        assert bound == pytest.approx(exact, rel=1e-9)


def test_wide_layers_dilation_and_groups():
    torch.manual_seed(0)
    for conv in (
        nn.Conv2d(64, 64, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        nn.Conv2d(8, 16, 3, padding=1, groups=4, stride=2),
    ):
        conv = conv.double()
        shape = (conv.in_channels, 6, 6)
        exact = dense_norm(conv, shape)
        circulant, _ = conv_bound(conv, shape, dense=False)
        bound, _ = conv_bound(conv, shape)
        assert circulant >= exact * (1 - 1e-12)
        assert bound == pytest.approx(exact, rel=1e-6)


def test_trained_spectral_conv_layers_are_bounded_within_one_percent():
    torch.manual_seed(1)
    conv = SpectralConv2d(4, 8, 3, padding="same")
    optimizer = torch.optim.Adam(conv.parameters(), lr=1e-2)
    for _ in range(20):
        optimizer.zero_grad()
        conv(torch.rand(8, 4, 8, 8)).square().mean().neg().backward()
        optimizer.step()
    conv.eval()
    exact = dense_norm(nn.Sequential(conv), (4, 8, 8))
    [layer] = layer_bounds(nn.Sequential(conv), (4, 8, 8))
    assert exact * (1 - 1e-12) <= layer.bound <= exact * 1.01
    assert layer.estimate <= layer.bound


def test_model_bound_estimate_and_heads():
    torch.manual_seed(2)
    model = LipschitzSequential(
        nn.Flatten(),
        SpectralLinear(16, 8),
        GroupSort2(),
        FrobeniusLinear(8, 4, disjoint=True),
        certificate_mode="classwise",
    )
    with torch.no_grad():
        model[3].parametrizations.weight.original.copy_(torch.randn(4, 8) + 1.0)
    whole = lipschitz_bound(model, (1, 4, 4))
    assert lipschitz_estimate(model, (1, 4, 4)) <= whole
    # Each unit-norm row: every logit is 1-Lipschitz although the whole map is not.
    assert whole > 1.05
    assert head_bound(model, (1, 4, 4)) == pytest.approx(1.0, abs=1e-6)
    assert head_bound(model, (1, 4, 4), "global") == whole


def test_a_broken_layer_shrinks_the_certificates():
    torch.manual_seed(3)
    model = LipschitzSequential(
        nn.Flatten(),
        SpectralLinear(16, 8),
        GroupSort2(),
        SpectralLinear(8, 3),
        certificate_mode="global",
    ).eval()
    x = torch.rand(32, 1, 4, 4)
    broken = vanilla_export(model)
    with torch.no_grad():
        broken[3].weight.mul_(1.01)
    logits, _, radii = certify.verified_predictions(broken, x, (1, 4, 4))
    bound = head_bound(broken, (1, 4, 4))
    assert bound > 1.0
    assert torch.allclose(radii, certify.certificates(logits, "global") / bound)
    assert bool((radii < certify.certificates(logits, "global")).all())


def test_unknown_layer_and_bad_shape_are_refused():
    with pytest.raises(TypeError, match="'1'"):
        lipschitz_bound(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), (3,))
    with pytest.raises(ValueError, match="input_shape"):
        lipschitz_bound(nn.Linear(3, 3), (0,))
