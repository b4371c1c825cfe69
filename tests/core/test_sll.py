"""SLLConv2d against independent truths: the exact Jacobian norm from the dense Jacobian on small
inputs, pairwise ratios, its plain export, onnxruntime, and the verified bound."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from liptune.bounds import layer_bounds, lipschitz_bound, sll_bound
from liptune.export import vanilla_export
from liptune.nn import LipschitzSequential, SLLConv2d, SLLResidual, SpectralLinear
from worker.spec import ResNetSpec
from worker.trial._models import build_model

torch.set_num_threads(1)


def scrambled(layer: SLLConv2d, seed: int) -> SLLConv2d:
    """Large random kernel, bias and weights q: far from the initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(3 * torch.randn(layer.weight.shape, generator=generator))
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator))
        layer.scaled.log_q.copy_(torch.randn(layer.scaled.log_q.shape, generator=generator))
    return layer


def jacobian_norm(module: nn.Module, x: torch.Tensor) -> float:
    matrix = jacobian(module, x.unsqueeze(0)).reshape(x.numel(), x.numel())
    return torch.linalg.matrix_norm(matrix, 2).item()


@pytest.mark.parametrize(
    ("channels", "inner", "kernel", "size"), [(2, 2, 3, 5), (3, 5, 3, 4), (4, 2, (3, 5), 6)]
)
def test_exact_jacobian_norm_is_at_most_one(channels, inner, kernel, size):
    for seed in range(3):
        layer = scrambled(SLLConv2d(channels, inner, kernel), seed).double().eval()
        for point in range(4):
            x = torch.randn(channels, size, size, dtype=torch.float64) * (point + 1)
            assert jacobian_norm(layer, x) <= 1 + 1e-9


def test_pairs_of_inputs_never_move_apart():
    layer = scrambled(SLLConv2d(3, 4, 3), 7).double()
    x = torch.randn(64, 3, 6, 6, dtype=torch.float64)
    y = x + 0.5 * torch.randn_like(x)
    with torch.no_grad():
        ratio = (layer(x) - layer(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert ratio.max() <= 1 + 1e-9
    assert ratio.max() > 0.5  # not a trivially contracting map


def test_where_the_relu_is_off_the_layer_is_the_identity():
    """A bias far below zero switches every inner unit off: h(x) = x exactly, the gradient
    norm passes through whole (what the mean residual halves)."""
    layer = SLLConv2d(2, 3, 3)
    with torch.no_grad():
        layer.bias.fill_(-1e3)
    x = torch.rand(2, 2, 5, 5)
    torch.testing.assert_close(layer(x), x)


def test_vanilla_export_is_plain_with_the_same_outputs_and_pickles():
    layer = scrambled(SLLConv2d(3, 4, 3), 1)
    plain = vanilla_export(layer)
    assert type(plain) is SLLResidual
    assert type(plain.conv) is nn.Conv2d and type(plain.transposed) is nn.ConvTranspose2d
    x = torch.randn(5, 3, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), layer.eval()(x))
        torch.testing.assert_close(pickle.loads(pickle.dumps(plain))(x), plain(x))


def test_eval_mode_caches_the_transposed_kernel_until_the_weights_change():
    layer = scrambled(SLLConv2d(2, 2, 3), 2).eval()
    first = layer.transposed_weight()
    assert layer.transposed_weight() is first
    with torch.no_grad():
        layer.weight.data.mul_(2)  # no version bump: the by-value check must see it
    second = layer.transposed_weight()
    assert second is not first
    torch.testing.assert_close(second, layer.train().transposed_weight())


def test_the_verified_bound_is_one_for_the_layer_and_catches_a_tampered_export():
    torch.manual_seed(0)
    model = LipschitzSequential(
        scrambled(SLLConv2d(2, 3, 3), 3), nn.Flatten(), SpectralLinear(2 * 5 * 5, 4)
    )
    assert lipschitz_bound(model, (2, 5, 5)) <= 1 + 1e-5
    (sll_layer, _) = layer_bounds(model, (2, 5, 5))
    assert sll_layer.method == "sll"
    assert 0.5 < sll_layer.estimate <= sll_layer.bound <= 1 + 1e-5

    tampered = vanilla_export(model[0]).double()
    with torch.no_grad():
        tampered.transposed.weight.mul_(3)  # t divided by 3: the SLL condition fails
        tampered.conv.bias.fill_(1e3)  # every inner unit on: the layer is I - 6 A^T T^-1 A
    worst = jacobian_norm(tampered, torch.randn(2, 5, 5, dtype=torch.float64))
    assert worst > 1.05  # the tampered layer really expands
    assert sll_bound(tampered, (2, 5, 5)) >= worst


def test_a_transposed_convolution_that_is_not_the_adjoint_is_refused():
    plain = vanilla_export(SLLConv2d(2, 2, 3))
    plain.transposed.padding = (0, 0)
    with pytest.raises(TypeError, match="same padding"):
        sll_bound(plain, (2, 5, 5))


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="odd kernel"):
        SLLConv2d(2, 2, 4)
    with pytest.raises(ValueError, match="channels"):
        SLLConv2d(0)
    with pytest.raises(ValueError, match="3 channels"):
        SLLConv2d(2)(torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="kernel_size"):
        build_model(ResNetSpec(block="sll", kernel_size=4), (1, 8, 8), 10)


def test_the_zoo_resnet_with_sll_blocks_is_one_lipschitz():
    model = build_model(ResNetSpec(block="sll", channels=[4, 8], blocks_per_stage=2), (1, 8, 8), 10)
    assert sum(isinstance(m, SLLConv2d) for m in model.modules()) == 4
    assert lipschitz_bound(model, (1, 8, 8)) <= 1 + 1e-5
