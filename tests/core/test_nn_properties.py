"""Property tests of liptune.nn: Lipschitz constants, gradient-norm preservation, export.

Every Lipschitz constant is computed independently of the layers' own bookkeeping: the
spectral norm of the dense Jacobian (for linear maps, the explicit operator matrix) of small
inputs, and difference quotients between random pairs of inputs.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from liptune.export import lipschitz_upper_bound, vanilla_export
from liptune.nn import (
    FrobeniusLinear,
    FullSort,
    GroupSort,
    GroupSort2,
    HouseHolder,
    InvertibleDownSampling,
    LipschitzResidual,
    LipschitzSequential,
    MaxMin,
    OrthoLinear,
    ScaledAvgPool2d,
    ScaledConcat,
    ScaledGlobalAvgPool2d,
    ScaledGlobalL2NormPool2d,
    ScaledL2NormPool2d,
    SpectralConv2d,
    SpectralLinear,
)

TOLERANCE = 1e-3
PROPERTY = settings(max_examples=30, deadline=None, derandomize=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def jacobian_norm(module: nn.Module, x: torch.Tensor) -> float:
    """Spectral norm of the Jacobian of ``module`` at one example ``x`` (no batch dim)."""
    jacobian = torch.autograd.functional.jacobian(lambda z: module(z.unsqueeze(0)), x)
    matrix = jacobian.reshape(-1, x.numel()).double()
    return torch.linalg.matrix_norm(matrix, 2).item()


def max_difference_quotient(module: nn.Module, shape: tuple[int, ...], seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((16, *shape), generator=generator)
    y = x + 0.3 * torch.randn((16, *shape), generator=generator)
    with torch.no_grad():
        out = (module(x) - module(y)).flatten(1).norm(dim=1)
    return (out / (x - y).flatten(1).norm(dim=1)).max().item()


def randomize_and_settle(layer: nn.Module, seed: int, scale: float, steps: int = 3) -> nn.Module:
    """Replace the free weight by a random one, take a few training-mode forwards, go eval."""
    generator = torch.Generator().manual_seed(seed)
    original = layer.parametrizations.weight.original
    with torch.no_grad():
        original.copy_(scale * torch.randn(original.shape, generator=generator))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator))
    layer.train()
    example_shape = (2, layer.in_features) if isinstance(layer, nn.Linear) else None
    for _ in range(steps):
        if example_shape is not None:
            layer(torch.zeros(example_shape))
        else:
            layer(torch.zeros(1, layer.in_channels, 8, 8))
    return layer.eval()


conv_settings = st.fixed_dictionaries(
    {
        "in_channels": st.integers(1, 3),
        "out_channels": st.integers(1, 5),
        "kernel_size": st.tuples(st.integers(1, 4), st.integers(1, 4)),
        "stride": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "padding": st.integers(0, 2),
        "padding_mode": st.sampled_from(["zeros", "circular"]),
        "size": st.tuples(st.integers(5, 8), st.integers(5, 8)),
        "scale": st.floats(0.01, 100.0),
        "seed": st.integers(0, 2**16),
        "bjorck_iterations": st.sampled_from([15, 3]),
    }
)


@PROPERTY
@given(conv_settings, st.booleans())
def test_spectral_conv_is_1_lipschitz(config, same_padding):
    stride = (1, 1) if same_padding else config["stride"]
    padding = "same" if same_padding else config["padding"]
    if config["padding_mode"] == "circular" and not same_padding:
        padding = min(padding, *config["kernel_size"])
    layer = SpectralConv2d(
        config["in_channels"],
        config["out_channels"],
        config["kernel_size"],
        stride=stride,
        padding=padding,
        padding_mode=config["padding_mode"],
        bjorck_iterations=config["bjorck_iterations"],
    )
    randomize_and_settle(layer, config["seed"], config["scale"])
    x = torch.randn(config["in_channels"], *config["size"])
    assert jacobian_norm(layer, x) <= 1 + TOLERANCE


@PROPERTY
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.floats(0.01, 100.0),
    st.integers(0, 2**16),
    st.sampled_from(["spectral", "no-bjorck", "frobenius", "ortho"]),
)
def test_dense_layers_are_1_lipschitz(in_features, out_features, scale, seed, kind):
    if kind == "spectral":
        layer = SpectralLinear(in_features, out_features)
    elif kind == "no-bjorck":
        layer = SpectralLinear(in_features, out_features, bjorck_iterations=0)
    elif kind == "frobenius":
        layer = FrobeniusLinear(in_features, out_features)
    else:
        layer = OrthoLinear(in_features, out_features)
    # Without Björck the bound rests on the power iteration alone: let it converge.
    randomize_and_settle(layer, seed, scale, steps=60 if kind == "no-bjorck" else 3)
    assert torch.linalg.matrix_norm(layer.weight.double(), 2).item() <= 1 + TOLERANCE
    assert max_difference_quotient(layer, (in_features,), seed) <= 1 + TOLERANCE


@PROPERTY
@given(st.integers(1, 12), st.integers(1, 40), st.floats(0.01, 100.0), st.integers(0, 2**16))
def test_disjoint_frobenius_rows_are_each_1_lipschitz(in_features, out_features, scale, seed):
    layer = randomize_and_settle(
        FrobeniusLinear(in_features, out_features, disjoint=True), seed, scale
    )
    row_norms = torch.linalg.vector_norm(layer.weight.double(), dim=1)
    assert torch.allclose(row_norms, torch.ones_like(row_norms), atol=1e-6)


@PROPERTY
@given(st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**16))
def test_spectral_linear_with_bjorck_is_gradient_norm_preserving(in_features, out_features, seed):
    """From the default (orthogonal) start, training keeps all singular values at 1."""
    torch.manual_seed(seed)
    layer = SpectralLinear(in_features, out_features)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        layer(torch.randn(8, in_features)).square().sum().backward()
        optimizer.step()
    singular_values = torch.linalg.svdvals(layer.eval().weight.double())
    assert torch.allclose(singular_values, torch.ones_like(singular_values), atol=1e-3)


@PROPERTY
@given(st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**16), st.floats(0.01, 100.0))
def test_bjorck_survives_a_stale_power_iteration(in_features, out_features, seed, scale):
    """Overwritten weights with one power step: finite, and still 1-Lipschitz."""
    layer = randomize_and_settle(SpectralLinear(in_features, out_features), seed, scale, steps=1)
    assert torch.isfinite(layer.weight).all()
    assert torch.linalg.matrix_norm(layer.weight.double(), 2).item() <= 1 + TOLERANCE


def gnp_activation(name: str, channels: int) -> nn.Module:
    return {
        "GroupSort2": lambda: GroupSort2(),
        "GroupSort": lambda: GroupSort(channels // 2 if channels % 4 == 0 else 2),
        "FullSort": lambda: FullSort(),
        "HouseHolder": lambda: HouseHolder(channels),
    }[name]()


@PROPERTY
@given(
    st.sampled_from(["GroupSort2", "GroupSort", "FullSort", "HouseHolder"]),
    st.sampled_from([2, 4, 6, 8]),
    st.sampled_from([(), (3, 3), (2, 5)]),
    st.integers(0, 2**16),
)
def test_gnp_activations_preserve_gradient_norm(name, channels, spatial, seed):
    layer = gnp_activation(name, channels)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(layer, HouseHolder):
        with torch.no_grad():
            layer.theta.uniform_(-math.pi, math.pi, generator=generator)
    x = torch.randn((1, channels, *spatial), generator=generator, requires_grad=True)
    v = torch.randn((1, channels, *spatial), generator=generator)
    (grad,) = torch.autograd.grad(layer(x), x, grad_outputs=v)
    assert grad.norm().item() == pytest.approx(v.norm().item(), rel=1e-5)
    assert max_difference_quotient(layer, (channels, *spatial), seed) <= 1 + 1e-5


@PROPERTY
@given(st.integers(1, 4), st.sampled_from([(), (2, 3)]), st.integers(0, 2**16))
def test_maxmin_is_an_isometry(channels, spatial, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1, channels, *spatial), generator=generator)
    jacobian = torch.autograd.functional.jacobian(MaxMin(), x).reshape(-1, x.numel())
    assert torch.allclose(jacobian.T @ jacobian, torch.eye(x.numel()))
    assert MaxMin()(x).norm().item() == pytest.approx(x.norm().item(), rel=1e-6)


pooling_layers = st.sampled_from(
    [
        lambda k: ScaledL2NormPool2d(k),
        lambda k: ScaledAvgPool2d(k),
        lambda k: ScaledGlobalL2NormPool2d(),
        lambda k: ScaledGlobalAvgPool2d(),
        lambda k: InvertibleDownSampling(k[0]),
    ]
)


@PROPERTY
@given(
    pooling_layers,
    st.tuples(st.integers(1, 3), st.integers(1, 3)),
    st.integers(1, 3),
    st.integers(0, 2**16),
)
def test_pooling_is_1_lipschitz(build, kernel, channels, seed):
    layer = build(kernel)
    k = kernel[0] if isinstance(layer, InvertibleDownSampling) else None
    size = (2 * (k or kernel[0]) + (0 if k else 1), 2 * (k or kernel[1]))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((channels, *size), generator=generator)
    assert jacobian_norm(layer, x) <= 1 + 1e-5
    assert max_difference_quotient(layer, (channels, *size), seed) <= 1 + 1e-5


def random_network(seed: int, padding_mode: str, residual: str, width: int) -> nn.Module:
    torch.manual_seed(seed)
    return LipschitzSequential(
        SpectralConv2d(1, width, 3, padding="same", padding_mode=padding_mode),
        GroupSort2(),
        LipschitzResidual(
            LipschitzSequential(SpectralConv2d(width, width, 3, padding=1), HouseHolder(width)),
            mode=residual,
        ),
        ScaledL2NormPool2d(2),
        ScaledConcat(
            SpectralConv2d(width, width, 2, stride=2), SpectralConv2d(width, width, 2, stride=2)
        ),
        nn.Flatten(),
        SpectralLinear(2 * width * 4, 8),
        MaxMin(),
        FrobeniusLinear(16, 3),
    )


def train_briefly(model: nn.Module, seed: int, steps: int = 3) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.rand((4, 1, 8, 8), generator=generator)).square().sum().backward()
        optimizer.step()
    return model.eval()


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    st.integers(0, 2**16),
    st.sampled_from(["zeros", "circular"]),
    st.sampled_from(["convex", "mean"]),
    st.sampled_from([2, 4]),
)
def test_built_network_bound_and_export(seed, padding_mode, residual, width):
    model = train_briefly(random_network(seed, padding_mode, residual, width), seed)
    x = torch.rand((5, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    exported = vanilla_export(model)
    with torch.no_grad():
        assert torch.allclose(exported(x), model(x), atol=1e-6)
    assert lipschitz_upper_bound(model, (1, 8, 8)) <= 1 + TOLERANCE
    assert jacobian_norm(model, x[0]) <= 1 + TOLERANCE


@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.integers(0, 2**16), st.sampled_from([1, 2]), st.sampled_from(["zeros", "circular"]))
def test_bound_of_an_unconstrained_network_exceeds_1(seed, stride, padding_mode):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=stride, padding=1, padding_mode=padding_mode),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * (8 // stride) ** 2, 10),
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)
    bound = lipschitz_upper_bound(model, (1, 8, 8))
    assert bound > 1
    # The bound is a product of the layers' exact norms, so it dominates the local slope.
    x = torch.rand(1, 8, 8)
    assert jacobian_norm(model, x) <= bound * (1 + 1e-6)
