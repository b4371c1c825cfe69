"""Unit tests of liptune.nn: caching, state, settings, errors, agreement with deel-torchlip."""

import math

import pytest
import torch
from deel import torchlip
from torch import nn

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
    bjorck_orthonormalize,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def count_constrain_calls(layer: nn.Module) -> list[int]:
    """Wrap the layer's parametrisation so that each real computation is counted."""
    parametrization = layer.parametrizations.weight[0]
    calls = [0]
    compute = parametrization.constrain

    def counted(weight):
        calls[0] += 1
        return compute(weight)

    parametrization.constrain = counted
    return calls


def perturb(layer: nn.Module) -> None:
    with torch.no_grad():
        original = layer.parametrizations.weight.original
        original.add_(0.3 * torch.randn_like(original))


# --- cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "input_shape"),
    [
        (lambda: SpectralLinear(6, 4), (2, 6)),
        (lambda: SpectralConv2d(2, 3, 3, padding=1), (2, 2, 5, 5)),
        (lambda: FrobeniusLinear(5, 3), (2, 5)),
        (lambda: OrthoLinear(5, 3), (2, 5)),
    ],
)
def test_eval_weight_is_computed_once_and_reused(build, input_shape):
    layer = build()
    calls = count_constrain_calls(layer)
    x = torch.randn(input_shape)
    layer.train()
    layer(x)
    layer(x)
    assert calls[0] == 2  # training mode recomputes at every access
    layer.eval()
    first = layer(x)
    for _ in range(3):
        assert torch.equal(layer(x), first)
    assert calls[0] == 3


def test_cache_is_dropped_by_train_and_by_an_optimizer_step():
    layer = SpectralLinear(6, 4)
    calls = count_constrain_calls(layer)
    x = torch.randn(3, 6)
    layer.eval()
    before = layer(x)
    layer.train()
    layer.eval()
    layer(x)
    assert calls[0] == 2
    # A step taken while in eval mode changes the free weight in place: the cache follows it.
    perturb(layer)
    after = layer(x)
    assert calls[0] == 3
    assert not torch.allclose(before, after)


def test_cache_is_dropped_by_load_state_dict():
    source, target = SpectralConv2d(2, 4, 3, padding=1), SpectralConv2d(2, 4, 3, padding=1)
    perturb(source)
    source.train()
    source(torch.randn(1, 2, 6, 6))
    calls = count_constrain_calls(target)
    x = torch.randn(2, 2, 6, 6)
    target.eval()
    target(x)
    target.load_state_dict(source.state_dict())
    source.eval()
    assert torch.allclose(target(x), source(x))
    assert calls[0] == 2


def test_state_dict_round_trip_keeps_power_iteration_vectors_and_outputs():
    model = LipschitzSequential(
        SpectralConv2d(1, 4, 3, padding="same"), GroupSort2(), nn.Flatten(), SpectralLinear(64, 3)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.rand(4, 1, 4, 4)).sum().backward()
        optimizer.step()
    state = model.state_dict()
    assert {"0.parametrizations.weight.0.u", "0.parametrizations.weight.0.v"} <= set(state)
    clone = LipschitzSequential(
        SpectralConv2d(1, 4, 3, padding="same"), GroupSort2(), nn.Flatten(), SpectralLinear(64, 3)
    )
    clone.load_state_dict(state)
    model.eval()
    clone.eval()
    x = torch.rand(5, 1, 4, 4)
    assert torch.equal(clone(x), model(x))


def test_power_iteration_vectors_move_only_in_training():
    layer = SpectralLinear(8, 5)
    perturb(layer)
    u = layer.parametrizations.weight[0].u
    before = u.clone()
    layer.eval()
    layer(torch.randn(2, 8))
    assert torch.equal(u, before)
    layer.train()
    layer(torch.randn(2, 8))
    assert not torch.equal(u, before)


def test_gradients_flow_to_the_free_weight_through_bjorck():
    layer = SpectralConv2d(2, 3, 3, padding=1)
    layer(torch.randn(2, 2, 5, 5)).square().sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert grad is not None and grad.abs().sum() > 0


# --- settings ------------------------------------------------------------------------------


def test_bjorck_stops_early_at_the_tolerance():
    q = torch.linalg.qr(torch.randn(6, 6)).Q
    matrix = q * torch.linspace(0.3, 1.0, 6)

    def gram_error(w):
        return torch.linalg.matrix_norm(w @ w.T - torch.eye(6)).item()

    converged = bjorck_orthonormalize(matrix, 50, 1e-5)
    assert gram_error(converged) < 2e-5
    steps = [
        k for k in range(50) if torch.equal(bjorck_orthonormalize(matrix, k, 1e-12), converged)
    ]
    assert steps and 2 < steps[0] < 20
    assert gram_error(bjorck_orthonormalize(matrix, steps[0] - 1, 1e-12)) > 1e-5


def test_bjorck_does_not_diverge_when_the_power_vectors_miss_the_top_direction():
    layer = SpectralLinear(4, 4)
    parametrization = layer.parametrizations.weight[0]
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.diag(torch.tensor([10.0, 1, 1, 1])))
        parametrization.u.copy_(torch.tensor([0.0, 1, 0, 0]))
        parametrization.v.copy_(torch.tensor([0.0, 1, 0, 0]))
    layer.eval()  # no power-iteration step: the estimate stays at 1, ten times too small
    assert torch.isfinite(layer.weight).all()
    assert torch.linalg.matrix_norm(layer.weight, 2).item() <= 1 + 1e-4


def test_no_bjorck_mode_is_plain_spectral_normalisation():
    layer = SpectralLinear(10, 6, bjorck_iterations=0, power_iterations=5)
    perturb(layer)
    for _ in range(10):
        layer(torch.randn(1, 10))
    layer.eval()
    singular_values = torch.linalg.svdvals(layer.weight)
    free = torch.linalg.svdvals(layer.parametrizations.weight.original.detach())
    assert singular_values[0].item() == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(singular_values, free / free[0], atol=1e-4)  # shape kept, only scaled


def test_conv_is_scaled_by_the_overlap_bound():
    layer = SpectralConv2d(4, 8, (3, 5), stride=(2, 2)).eval()
    matrix = layer.weight.reshape(8, -1)
    expected = 1 / math.sqrt(math.ceil(3 / 2) * math.ceil(5 / 2))
    assert torch.linalg.matrix_norm(matrix, 2).item() == pytest.approx(expected, rel=1e-4)


def test_default_initialisation_is_orthogonal():
    layer = SpectralLinear(16, 8)
    free = layer.parametrizations.weight.original.detach()
    assert torch.allclose(free @ free.T, torch.eye(8), atol=1e-5)


def test_ortho_linear_is_exactly_orthogonal_after_training():
    layer = OrthoLinear(5, 9)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.randn(4, 5)).sum().backward()
        optimizer.step()
    weight = layer.weight
    assert torch.allclose(weight.T @ weight, torch.eye(5), atol=1e-5)


def test_certificate_mode_is_inferred_or_validated():
    assert LipschitzSequential(SpectralLinear(4, 1)).certificate_mode == "binary"
    assert LipschitzSequential(SpectralLinear(4, 3)).certificate_mode == "global"
    head = FrobeniusLinear(4, 3, disjoint=True)
    assert LipschitzSequential(SpectralLinear(4, 4), head).certificate_mode == "classwise"
    explicit = LipschitzSequential(SpectralLinear(4, 3), certificate_mode="classwise")
    assert explicit.certificate_mode == "classwise"
    with pytest.raises(ValueError, match="certificate_mode"):
        LipschitzSequential(SpectralLinear(4, 3), certificate_mode="top2")


# --- activations, pooling, merges ----------------------------------------------------------


def test_groupsort2_equals_groupsort_of_two_and_householder_at_init():
    x = torch.randn(3, 8, 4, 4)
    expected = GroupSort(2)(x)
    assert torch.equal(GroupSort2()(x), expected)
    assert torch.allclose(HouseHolder(8)(x), expected, atol=1e-6)
    assert torch.equal(FullSort()(x), x.sort(dim=1).values)


def test_groupsort2_passes_ties_through_with_full_gradient():
    x = torch.zeros(1, 2, requires_grad=True)
    GroupSort2()(x).backward(torch.tensor([[1.0, 2.0]]))
    assert x.grad.tolist() == [[1.0, 2.0]]


def test_l2_pool_has_no_nan_gradient_on_zero_windows():
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 0, 0] = 3.0
    x.requires_grad_(True)
    for layer in (ScaledL2NormPool2d(2), ScaledGlobalL2NormPool2d()):
        (grad,) = torch.autograd.grad(layer(x).sum(), x)
        assert torch.isfinite(grad).all()
        assert grad[0, 0, 0, 0].item() == pytest.approx(1.0)
        assert grad[0, 1].abs().sum().item() == 0.0


def test_pooling_values():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    l2 = ScaledL2NormPool2d(2)(x)
    assert l2[0, 0, 0, 0].item() == pytest.approx(math.sqrt(0 + 1 + 16 + 25))
    assert ScaledAvgPool2d(2)(x)[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 4 + 5) / 2)
    assert ScaledGlobalAvgPool2d()(x).item() == pytest.approx(x.sum().item() / 4)
    assert ScaledGlobalL2NormPool2d()(x).item() == pytest.approx(x.norm().item())
    down = InvertibleDownSampling(2)(x)
    assert down.shape == (1, 4, 2, 2)
    assert torch.equal(down.flatten().sort().values, x.flatten())


def test_residual_and_concat():
    block = SpectralLinear(4, 4)
    x = torch.randn(2, 4)
    assert torch.allclose(LipschitzResidual(block, mode="mean")(x), (x + block(x)) / 2)
    convex = LipschitzResidual(block)
    assert convex.skip_weight == pytest.approx(0.5)
    assert "logit" in dict(convex.named_parameters())
    concat = ScaledConcat(block, nn.Identity())
    assert torch.allclose(concat(x), torch.cat([block(x), x], dim=1) / math.sqrt(2))


# --- agreement with deel-torchlip ---------------------------------------------------------


def test_activations_and_pooling_match_deel_torchlip():
    x = torch.randn(4, 8, 6, 6)
    assert torch.allclose(GroupSort2()(x), torchlip.GroupSort2()(x))
    assert torch.allclose(GroupSort(4)(x), torchlip.GroupSort(4)(x))
    assert torch.allclose(FullSort()(x), torchlip.FullSort()(x))
    assert torch.allclose(MaxMin()(x), torchlip.MaxMin()(x))
    assert torch.allclose(ScaledL2NormPool2d(2)(x), torchlip.ScaledL2NormPool2d(2)(x), atol=1e-5)
    assert torch.allclose(ScaledAvgPool2d(3)(x), torchlip.ScaledAvgPool2d(3)(x), atol=1e-5)
    vectors = torch.randn(5, 6)
    assert torch.allclose(GroupSort2()(vectors), torchlip.GroupSort2()(vectors))


def test_spectral_layers_reach_unit_spectral_norm_like_deel_torchlip():
    ours = SpectralLinear(30, 12)
    theirs = torchlip.SpectralLinear(30, 12)
    for layer in (ours, theirs):
        layer.train()
        layer(torch.randn(2, 30))
        layer.eval()
    ours_norm = torch.linalg.matrix_norm(ours.weight.detach(), 2).item()
    theirs_norm = torch.linalg.matrix_norm(theirs.weight.detach(), 2).item()
    assert ours_norm == pytest.approx(1.0, abs=1e-3)
    assert ours_norm == pytest.approx(theirs_norm, abs=1e-2)


# --- bad input -----------------------------------------------------------------------------


def test_wrong_input_shapes_are_named():
    with pytest.raises(ValueError, match=r"4-D \(N, C, H, W\).*3-D"):
        SpectralConv2d(1, 2, 3)(torch.randn(1, 8, 8))
    with pytest.raises(ValueError, match="expects 3 input channels, got 1"):
        SpectralConv2d(3, 2, 3)(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\(\*, 5\)"):
        SpectralLinear(5, 2)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="4-D"):
        ScaledL2NormPool2d(2)(torch.randn(2, 8))
    with pytest.raises(ValueError, match="divisible by 2"):
        InvertibleDownSampling(2)(torch.randn(1, 1, 5, 4))
    with pytest.raises(ValueError, match="channels"):
        HouseHolder(4)(torch.randn(2, 6))


def test_group_size_not_dividing_channels_names_both():
    with pytest.raises(ValueError, match=r"groups of 3 channels.*has 8 channels"):
        GroupSort(3)(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"groups of 2 channels.*has 5 channels"):
        GroupSort2()(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="must be even"):
        HouseHolder(5)


def test_pooling_stride_different_from_window_is_refused():
    with pytest.raises(ValueError, match=r"stride equal to kernel_size.*\(2, 2\).*\(1, 1\)"):
        ScaledL2NormPool2d(2, stride=1)
    with pytest.raises(ValueError, match="stride equal to kernel_size"):
        ScaledAvgPool2d(3, stride=2)


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: SpectralLinear(4, 4, power_iterations=0), "power_iterations"),
        (lambda: SpectralLinear(4, 4, bjorck_iterations=-1), "bjorck_iterations"),
        (lambda: SpectralLinear(4, 4, bjorck_tolerance=float("nan")), "bjorck_tolerance"),
        (lambda: SpectralLinear(4, 4, bjorck_tolerance=0.0), "bjorck_tolerance"),
        (lambda: SpectralConv2d(1, 2, 3, bjorck_tolerance=float("inf")), "bjorck_tolerance"),
        (lambda: SpectralConv2d(1, 2, 0), "kernel_size"),
        (lambda: SpectralConv2d(1, 2, 3, stride=0), "stride"),
        (lambda: SpectralConv2d(1, 2, 3, padding=-1), "padding"),
        (lambda: SpectralConv2d(1, 2, 3, stride=2, padding="same"), "same"),
        (lambda: SpectralConv2d(1, 2, 3, padding_mode="reflect"), "padding_mode"),
        (lambda: SpectralLinear(0, 4), "in_features"),
        (lambda: GroupSort(0), "group_size"),
        (lambda: ScaledL2NormPool2d(0), "kernel_size"),
        (lambda: LipschitzResidual(nn.Identity(), mode="sum"), "mode"),
    ],
)
def test_bad_settings_are_refused_by_name(build, name):
    with pytest.raises(ValueError, match=name):
        build()


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (GroupSort2(), (2, 6, 3, 3)),
        (GroupSort2(), (3, 4)),
        (ScaledL2NormPool2d(2), (2, 3, 4, 4)),
        (ScaledL2NormPool2d((2, 3)), (1, 2, 5, 7)),  # border rows/columns are dropped
        (ScaledGlobalL2NormPool2d(), (2, 3, 3, 3)),
    ],
)
def test_hand_written_backwards_match_finite_differences(layer, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
