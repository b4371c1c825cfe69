"""Property tests of the GNP convolution families (AOL, BCOP).

The truth is independent of the layers: the dense matrix of the *exported* plain
``nn.Conv2d`` on a small input (one column per basis image, float64) and its SVD. Export must
give identical outputs, the direct ONNX writer must agree with onnxruntime, and the
guaranteed bound of the exported model must cover the layer.
"""

import numpy as np
import onnxruntime
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from liptune.bounds import lipschitz_bound
from liptune.export import export_onnx, vanilla_export
from liptune.nn import AOLConv2d, BCOPConv2d, GroupSort2, LipschitzSequential

FAMILIES = (AOLConv2d, BCOPConv2d)
ROUNDING = 1e-9
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dense_matrix(conv: nn.Conv2d, shape: tuple[int, int, int]) -> torch.Tensor:
    """The matrix of the (bias-free) linear map ``conv`` on inputs of ``shape``."""
    n = int(np.prod(shape))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        outputs = conv._conv_forward(basis, conv.weight.double(), None)
    return outputs.reshape(n, -1).T


def singular_values(layer: nn.Conv2d, size: int) -> torch.Tensor:
    plain = vanilla_export(layer).double()
    assert type(plain) is nn.Conv2d
    return torch.linalg.svdvals(dense_matrix(plain, (layer.in_channels, size, size)))


def randomize(layer: nn.Conv2d, seed: int, steps: int = 2) -> nn.Conv2d:
    """Random free weights, a few training-mode accesses, then eval (the cached weight)."""
    generator = torch.Generator().manual_seed(seed)
    original = layer.parametrizations.weight.original
    with torch.no_grad():
        original.copy_(torch.randn(original.shape, generator=generator, dtype=original.dtype))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator))
    layer.train()
    for _ in range(steps):
        layer(torch.zeros(1, layer.in_channels, 6, 6, dtype=original.dtype))
    return layer.eval()


configs = st.fixed_dictionaries(
    {
        "family": st.sampled_from(FAMILIES),
        "in_channels": st.integers(1, 4),
        "out_channels": st.integers(1, 4),
        "kernel": st.tuples(st.integers(1, 4), st.integers(1, 4)),
        "stride": st.sampled_from([(1, 1), (2, 2), (1, 2)]),
        "padding": st.one_of(st.just("same"), st.tuples(st.integers(0, 2), st.integers(0, 2))),
        "padding_mode": st.sampled_from(["zeros", "circular"]),
        "seed": st.integers(0, 2**16),
    }
)


def build(config: dict) -> nn.Conv2d:
    padding = config["padding"]
    stride = config["stride"]
    if padding == "same":
        stride = (1, 1)
    elif config["padding_mode"] == "circular":
        kh, kw = config["kernel"]
        padding = (min(padding[0], (kh - 1) // 2), min(padding[1], (kw - 1) // 2))
    layer = config["family"](
        config["in_channels"],
        config["out_channels"],
        config["kernel"],
        stride=stride,
        padding=padding,
        padding_mode=config["padding_mode"],
    ).double()
    return randomize(layer, config["seed"])


@PROPERTY
@given(configs)
def test_exact_norm_of_every_valid_config_is_at_most_one(config):
    layer = build(config)
    assert singular_values(layer, 5).max().item() <= 1 + ROUNDING


@PROPERTY
@given(
    st.integers(1, 4),
    st.integers(1, 4),
    st.tuples(st.integers(1, 4), st.integers(1, 4)),
    st.integers(0, 2**16),
)
def test_bcop_circular_same_is_exactly_orthogonal(in_channels, out_channels, kernel, seed):
    layer = randomize(
        BCOPConv2d(
            in_channels, out_channels, kernel, padding="same", padding_mode="circular"
        ).double(),
        seed,
    )
    values = singular_values(layer, 5)
    # min(in, out) * 25 singular values of a (out * 25, in * 25) matrix, all exactly 1.
    assert values.numel() == min(in_channels, out_channels) * 25
    torch.testing.assert_close(values, torch.ones_like(values), atol=1e-10, rtol=0)


def test_bcop_zero_padding_is_nearly_norm_preserving_inside():
    layer = randomize(BCOPConv2d(4, 4, 3, padding="same").double(), seed=3)
    values = singular_values(layer, 8)
    assert values.max().item() <= 1 + ROUNDING
    # The plane's orthogonal map cropped at the border: most singular values stay at 1.
    assert (values > 1 - 1e-6).float().mean().item() > 0.5


def test_aol_at_initialisation_is_an_orthogonal_one_by_one_conv():
    layer = AOLConv2d(3, 6, 3, padding="same").eval()
    values = singular_values(layer, 5)
    # Initialised in float32: orthogonal to float32 rounding.
    torch.testing.assert_close(values, torch.ones_like(values), atol=1e-6, rtol=0)


def test_aol_rescaling_is_what_keeps_the_norm_below_one():
    # Independent check of the theorem's premise: the raw kernel is far above 1, AOL's is not.
    layer = randomize(AOLConv2d(3, 3, 3, padding="same").double(), seed=1)
    raw = nn.Conv2d(3, 3, 3, padding="same", bias=False).double()
    with torch.no_grad():
        raw.weight.copy_(layer.parametrizations.weight.original)
    raw_norm = torch.linalg.svdvals(dense_matrix(raw, (3, 5, 5))).max().item()
    assert raw_norm > 2
    assert singular_values(layer, 5).max().item() <= 1 + ROUNDING


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_flows_to_the_free_parameter(family):
    layer = family(2, 4, 3, padding="same")
    layer(torch.randn(2, 2, 6, 6)).square().sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert grad is not None and grad.abs().sum().item() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_cache_follows_optimizer_steps_and_load_state_dict(family):
    layer = family(3, 3, 3, padding="same").eval()
    first = layer.weight
    assert layer.weight is first  # cached
    with torch.no_grad():
        layer.parametrizations.weight.original.add_(0.5)
    changed = layer.weight
    assert not torch.equal(changed, first)
    other = family(3, 3, 3, padding="same")
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other.eval().weight, changed)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_export_outputs_are_identical(family, padding_mode):
    torch.manual_seed(0)
    layer = randomize(family(3, 5, 3, padding="same", padding_mode=padding_mode), seed=5)
    x = torch.rand(4, 3, 9, 9)
    plain = vanilla_export(layer)
    assert type(plain) is nn.Conv2d
    assert not hasattr(plain, "parametrizations")
    with torch.no_grad():
        assert torch.equal(plain(x), layer(x))


def small_net(family) -> LipschitzSequential:
    torch.manual_seed(0)
    return LipschitzSequential(
        family(1, 4, 3, padding="same", padding_mode="circular"),
        GroupSort2(),
        family(4, 4, 3, stride=2, padding=1),
        GroupSort2(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
        certificate_mode="global",
    ).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_outputs_equal_onnxruntime(family, tmp_path):
    model = small_net(family)
    path = export_onnx(model, tmp_path / "net.onnx", (1, 8, 8))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 1, 8, 8)
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_guaranteed_bound_covers_the_layer(family):
    layer = randomize(family(2, 3, 3, padding="same").double(), seed=9)
    exact = singular_values(layer, 6).max().item()
    bound = lipschitz_bound(LipschitzSequential(layer), (2, 6, 6))
    assert exact - 1e-6 <= bound <= 1 + 1e-6


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"padding": 2, "padding_mode": "circular"}, "circular padding 2"),
        ({"padding": "same", "stride": 2}, 'padding="same" needs stride 1'),
        ({"padding": "valid"}, "padding must be"),
        ({"padding_mode": "reflect"}, "padding_mode must be one of"),
        ({"padding": -1}, "padding must be integers >= 0"),
    ],
)
def test_invalid_configs_are_refused_with_the_argument_named(family, kwargs, message):
    with pytest.raises(ValueError, match=family.__name__):
        family(2, 2, 3, **kwargs)
    with pytest.raises(ValueError, match=message):
        family(2, 2, 3, **kwargs)


def test_bcop_rank_is_checked():
    with pytest.raises(ValueError, match="rank must be at most"):
        BCOPConv2d(2, 3, 3, rank=4)


def test_aol_scales_match_orthogonium():
    # orthogonium (Boissin et al.) rescales output channels: on the transposed, flipped kernel
    # (the adjoint convolution) its AOL is ours.
    from orthogonium.layers.conv.AOL import aol

    generator = torch.Generator().manual_seed(0)
    kernel = torch.randn((5, 3, 3, 2), generator=generator, dtype=torch.float64)
    theirs = aol.AOLReparametrizer(3, 1).double()(kernel.transpose(0, 1).flip(-2, -1))
    ours = AOLConv2d(3, 5, (3, 2)).parametrizations.weight[0].double().constrain(kernel)
    torch.testing.assert_close(theirs.flip(-2, -1).transpose(0, 1), ours, rtol=1e-12, atol=1e-12)
