"""liptune.certify on hand-made logits (exact values) and its consistency across eps."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from liptune import certify
from liptune import nn as lnn

torch.set_num_threads(1)

SQRT2 = math.sqrt(2.0)
BINARY_OUTPUTS = torch.tensor([[2.0], [-0.5], [0.0], [1.5]], dtype=torch.float64)
#: right (radius 2), right (0.5), wrong (f = 0 predicts the negative class), wrong (1.5).
BINARY_TARGET = torch.tensor([1, 0, 1, 0])
MULTICLASS_OUTPUTS = torch.tensor(
    [[3.0, 1.0, 0.0], [0.0, 0.5, 2.5], [1.0, 1.0, 0.0], [0.0, 4.0, 1.0]], dtype=torch.float64
)
#: right (gap 2), right (gap 2), wrong (tie, argmax is class 0), wrong (gap 3).
MULTICLASS_TARGET = torch.tensor([0, 2, 1, 2])


def test_binary_certificates_are_absolute_logits():
    expected = torch.tensor([2.0, 0.5, 0.0, 1.5], dtype=torch.float64)
    torch.testing.assert_close(certify.certificates(BINARY_OUTPUTS, "binary"), expected)
    torch.testing.assert_close(certify.certificates(BINARY_OUTPUTS[:, 0], "binary"), expected)


@pytest.mark.parametrize(("mode", "scale"), [("global", 1 / SQRT2), ("classwise", 0.5)])
def test_multiclass_certificates_are_scaled_top2_gaps(mode, scale):
    expected = torch.tensor([2.0, 2.0, 0.0, 3.0], dtype=torch.float64) * scale
    torch.testing.assert_close(certify.certificates(MULTICLASS_OUTPUTS, mode), expected)


def test_certified_accuracy_exact_values():
    eps = [0.0, 0.5, 1.0, 2.0]
    binary = certify.certified_robust_accuracy(BINARY_OUTPUTS, BINARY_TARGET, eps, "binary")
    torch.testing.assert_close(binary, torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64))
    signs = 2 * BINARY_TARGET - 1
    same = certify.certified_robust_accuracy(BINARY_OUTPUTS, signs, eps, "binary")
    torch.testing.assert_close(same, binary)
    # global radii of the correct points: sqrt(2) and sqrt(2).
    multiclass = certify.certified_robust_accuracy(
        MULTICLASS_OUTPUTS, MULTICLASS_TARGET, [0.0, 1.4, 1.5], "global"
    )
    torch.testing.assert_close(multiclass, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    one_hot = nn.functional.one_hot(MULTICLASS_TARGET, 3)
    classwise = certify.certified_robust_accuracy(MULTICLASS_OUTPUTS, one_hot, 1.0, "classwise")
    assert classwise.shape == ()
    assert classwise.item() == 0.0  # radius 1 is not > eps = 1


def test_provable_avg_robustness_exact_values():
    """Mean over all points of the certificate of the correct ones (0 for the wrong ones)."""
    binary = certify.provable_avg_robustness(BINARY_OUTPUTS, BINARY_TARGET, "binary")
    assert binary.item() == pytest.approx((2.0 + 0.5) / 4)
    multiclass = certify.provable_avg_robustness(MULTICLASS_OUTPUTS, MULTICLASS_TARGET, "global")
    assert multiclass.item() == pytest.approx(4.0 / SQRT2 / 4)


def test_mean_certifiable_robustness_exact_values():
    """E[y f(x)] (binary) and E[f_y - max_{j != y} f_j] times 1/sqrt(2) or 1/2."""
    binary = certify.mean_certifiable_robustness(BINARY_OUTPUTS, BINARY_TARGET, "binary")
    assert binary.item() == pytest.approx((2.0 + 0.5 - 0.0 - 1.5) / 4)
    margins_sum = 2.0 + 2.0 + 0.0 - 3.0
    for mode, scale in (("global", 1 / SQRT2), ("classwise", 0.5)):
        value = certify.mean_certifiable_robustness(MULTICLASS_OUTPUTS, MULTICLASS_TARGET, mode)
        assert value.item() == pytest.approx(margins_sum / 4 * scale)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 60),
    classes=st.sampled_from([1, 2, 3, 10]),
    eps=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=8),
    mode=st.sampled_from(["global", "classwise"]),
)
def test_certified_accuracy_one_pass_matches_per_eps(seed, n, classes, eps, mode):
    generator = torch.Generator().manual_seed(seed)
    outputs = torch.randn(n, classes, generator=generator, dtype=torch.float64)
    if classes == 1:
        mode = "binary"
        target = torch.randint(0, 2, (n,), generator=generator)
    else:
        target = torch.randint(0, classes, (n,), generator=generator)
    together = certify.certified_robust_accuracy(outputs, target, eps, mode)
    assert together.shape == (len(eps),)
    one_by_one = torch.stack(
        [certify.certified_robust_accuracy(outputs, target, value, mode) for value in eps]
    )
    torch.testing.assert_close(together, one_by_one)
    ascending = certify.certified_robust_accuracy(outputs, target, sorted(eps), mode)
    assert bool((ascending[1:] <= ascending[:-1]).all())
    # Definition: correct and radius > eps.
    radii = certify.certificates(outputs, mode)
    if mode == "binary":
        correct = (outputs[:, 0] > 0) == (target > 0)
    else:
        correct = outputs.argmax(dim=1) == target
    for value, accuracy in zip(eps, together.tolist(), strict=True):
        assert accuracy == pytest.approx((correct & (radii > value)).double().mean().item())


def test_provable_avg_robustness_is_the_area_under_certified_accuracy():
    generator = torch.Generator().manual_seed(1)
    outputs = torch.randn(200, 10, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 10, (200,), generator=generator)
    grid = torch.linspace(0.0, 3.0, 30001, dtype=torch.float64)
    curve = certify.certified_robust_accuracy(outputs, target, grid, "global")
    area = torch.trapezoid(curve, grid).item()
    expected = certify.provable_avg_robustness(outputs, target, "global").item()
    assert area == pytest.approx(expected, abs=1e-3)


def test_certificate_mode_reads_the_model():
    binary = lnn.LipschitzSequential(
        lnn.SpectralLinear(4, 8), lnn.GroupSort2(), lnn.SpectralLinear(8, 1)
    )
    multiclass = lnn.LipschitzSequential(lnn.SpectralLinear(4, 3))
    assert certify.certificate_mode(binary) == "binary"
    assert certify.certificate_mode(multiclass) == "global"
    with pytest.raises(ValueError, match="Sequential has no certificate_mode"):
        certify.certificate_mode(nn.Sequential(nn.Linear(4, 3)))
    plain = nn.Linear(4, 3)
    plain.certificate_mode = "lipschitz"
    with pytest.raises(ValueError, match="certificate mode must be one of"):
        certify.certificate_mode(plain)


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_predict_with_certificates_batches_in_eval_mode(batch_size):
    torch.manual_seed(0)
    model = lnn.LipschitzSequential(
        lnn.SpectralLinear(5, 16), lnn.GroupSort2(), lnn.SpectralLinear(16, 4)
    )
    model.train()
    x = torch.rand(23, 5)
    logits, predictions, radii = certify.predict_with_certificates(model, x, batch_size=batch_size)
    assert model.training, "the caller's train mode is restored"
    assert not logits.requires_grad
    model.eval()
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(predictions, expected.argmax(dim=1))
    torch.testing.assert_close(radii, certify.certificates(expected, "global"))


def test_predict_with_certificates_binary_predictions():
    model = nn.Linear(2, 1)
    model.certificate_mode = "binary"
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0]]))
        model.bias.fill_(-0.5)
    x = torch.tensor([[0.9, 0.1], [0.2, 0.7]])
    _, predictions, radii = certify.predict_with_certificates(model, x)
    assert predictions.tolist() == [1, 0]
    torch.testing.assert_close(radii, torch.tensor([0.4, 0.3]))


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="certificate mode must be one of"):
        certify.certificates(MULTICLASS_OUTPUTS, "l2")
    with pytest.raises(ValueError, match=r"'binary' certificates need outputs of shape"):
        certify.certificates(MULTICLASS_OUTPUTS, "binary")
    with pytest.raises(ValueError, match=r"'global' certificates need outputs of shape"):
        certify.certificates(BINARY_OUTPUTS, "global")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        certify.certified_robust_accuracy(BINARY_OUTPUTS, BINARY_TARGET, [0.1, -0.1], "binary")
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(3,\)"):
        certify.certified_robust_accuracy(MULTICLASS_OUTPUTS, MULTICLASS_TARGET[:3], 0.1, "global")
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\]"):
        certify.provable_avg_robustness(MULTICLASS_OUTPUTS, torch.tensor([0, 1, 2, 3]), "global")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        certify.predict_with_certificates(
            lnn.LipschitzSequential(lnn.SpectralLinear(2, 2)), torch.rand(3, 2), batch_size=0
        )


def test_gradient_norm_ratio_is_the_exact_tightness_of_a_linear_model():
    """For f(x) = Wx + b the distance from x to the set where class j overtakes the top class i
    is (f_i - f_j) / ||w_i - w_j||: the ratio must equal certificate / that distance."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4).double()
    with torch.no_grad():
        layer.weight.copy_(layer.weight / torch.linalg.matrix_norm(layer.weight, ord=2))
    x = torch.randn(32, 6, dtype=torch.float64)
    outputs = layer(x).detach()
    top2 = outputs.topk(2, dim=1).indices
    rows = layer.weight.detach()[top2[:, 0]] - layer.weight.detach()[top2[:, 1]]
    gaps = outputs.gather(1, top2[:, :1]).squeeze(1) - outputs.gather(1, top2[:, 1:]).squeeze(1)
    distance = gaps / rows.norm(dim=1)
    for mode, lipschitz in (("global", 1.0), ("classwise", 1.0), ("global", 0.5)):
        ratio = certify.gradient_norm_ratio(layer, x, mode, lipschitz=lipschitz)
        radius = certify.certificates(outputs, mode, lipschitz=lipschitz)
        torch.testing.assert_close(ratio, radius / distance)


def test_gradient_norm_ratio_is_one_for_an_orthogonal_map_and_scales_with_it():
    torch.manual_seed(1)
    orthogonal = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        orthogonal.weight.copy_(torch.linalg.qr(torch.randn(8, 8))[0])
    x = torch.randn(16, 8)
    torch.testing.assert_close(
        certify.gradient_norm_ratio(orthogonal, x, "global"),
        torch.ones(16, dtype=torch.float64),
        rtol=1e-6,  # the float32 weights are orthogonal to float32 precision
        atol=0.0,
    )
    with torch.no_grad():
        orthogonal.weight.mul_(0.5)
    torch.testing.assert_close(
        certify.gradient_norm_ratio(orthogonal, x, "global"),
        torch.full((16,), 0.5).double(),
        rtol=1e-6,
        atol=0.0,
    )
    binary = nn.Linear(8, 1)
    ratio = certify.gradient_norm_ratio(binary, x, "binary", lipschitz=2.0)
    expected = binary.weight.detach().norm().double() / 2.0
    torch.testing.assert_close(ratio, expected.expand(16))


def test_gradient_norm_ratio_rejects_bad_arguments():
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="lipschitz"):
        certify.gradient_norm_ratio(model, torch.randn(2, 4), "global", lipschitz=0.0)
    with pytest.raises(ValueError, match="certificate mode"):
        certify.gradient_norm_ratio(model, torch.randn(2, 4), "top1")
