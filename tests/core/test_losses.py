"""liptune.losses against deel-torchlip 1.0.5 (outputs only), plus input validation.

Conventions converted in these tests (read from deel-torchlip 1.0.5's source):

* ``min_margin`` (deel) is ``margin`` (liptune): both hinge with ``relu(margin / 2 - y f)``.
* deel's ``alpha`` is already normalised, in [0, 1]: ``alpha = alpha_kr / (1 + alpha_kr)``, and
  ``alpha_kr = inf`` is deel's ``alpha = 1`` (hinge only); deel computes
  ``alpha * hinge - (1 - alpha) * kr`` like liptune.
* deel's ``KRLoss`` / ``KRMulticlassLoss`` return the Wasserstein estimate (to maximise);
  liptune's ``KRLoss`` / ``MulticlassKRLoss`` return its negative (to minimise), i.e. deel's
  ``NegKRLoss``.
* deel's multiclass losses take one-hot targets; liptune takes indices or one-hot.
* deel's ``SoftHKRMulticlassLoss`` adapts its softmax temperature to a running mean of |f|:
  ``clamp(temperature * min_margin / clamp(mean, min_margin, 2e4), 0.005, 250)`` with the running
  mean starting at ``min_margin`` and updated with weight ``1 - alpha_mean``. With
  ``alpha_mean=1`` the mean stays at ``min_margin`` and the effective temperature is exactly
  ``temperature``, liptune's fixed temperature (for temperatures in [0.005, 250]).
* deel's ``tau`` is liptune's ``temperature``.

The offset cross-entropy is checked against orthogonium 0.0.4's ``LossXent(n_classes, offset,
temperature)``, which divides by its temperature T: liptune's ``margin`` is its ``offset`` and
liptune's ``temperature`` is ``1 / T``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from deel import torchlip
from hypothesis import given, settings
from hypothesis import strategies as st

from liptune import losses

torch.set_num_threads(1)
warnings.filterwarnings("ignore", module="deel")

REDUCTIONS = ("mean", "sum", "none")
fast = settings(max_examples=25, deadline=None)


def deel_alpha(alpha_kr: float) -> float:
    return 1.0 if math.isinf(alpha_kr) else alpha_kr / (1.0 + alpha_kr)


def binary_batch(seed: int, n: int, encoding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (n, 1) float64 and the labels in {0, 1} (n, 1): both classes present."""
    generator = torch.Generator().manual_seed(seed)
    outputs = 2.0 * torch.randn(n, 1, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 2, (n, 1), generator=generator)
    labels[0], labels[1] = 0, 1
    if encoding == "signs":
        return outputs, (2 * labels - 1).double()
    return outputs, labels.double()


def multiclass_batch(seed: int, n: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    outputs = 2.0 * torch.randn(n, classes, generator=generator, dtype=torch.float64)
    return outputs, torch.randint(0, classes, (n,), generator=generator)


alphas = st.sampled_from([0.0, 0.3, 1.0, 5.0, 50.0, 1000.0, math.inf])
margins = st.floats(0.05, 3.0)
seeds = st.integers(0, 2**31 - 1)


# --------------------------------------------------------------------------- binary


@fast
@given(
    seed=seeds,
    n=st.integers(2, 40),
    encoding=st.sampled_from(["zero_one", "signs"]),
    flat=st.booleans(),
    alpha_kr=alphas,
    margin=margins,
    reduction=st.sampled_from(REDUCTIONS),
)
def test_binary_losses_match_deel(seed, n, encoding, flat, alpha_kr, margin, reduction):
    """HKR(alpha_kr, margin) = deel HKRLoss(alpha_kr / (1 + alpha_kr), min_margin=margin);
    KRLoss = -deel KRLoss; HingeMarginLoss(margin) = deel HingeMarginLoss(min_margin=margin).
    liptune also takes (N,) outputs and targets: deel gets them as (N, 1)."""
    outputs, target = binary_batch(seed, n, encoding)
    ours_outputs, ours_target = (outputs[:, 0], target[:, 0]) if flat else (outputs, target)
    pairs = [
        (
            losses.HKRLoss(alpha_kr, margin, reduction=reduction),
            torchlip.HKRLoss(deel_alpha(alpha_kr), margin, reduction=reduction),
            1.0,
        ),
        (losses.KRLoss(reduction=reduction), torchlip.KRLoss(reduction=reduction), -1.0),
        (
            losses.HingeMarginLoss(margin, reduction=reduction),
            torchlip.HingeMarginLoss(margin, reduction=reduction),
            1.0,
        ),
    ]
    for ours, theirs, sign in pairs:
        expected = sign * theirs(outputs, target)
        torch.testing.assert_close(ours(ours_outputs, ours_target), expected, msg=repr(ours))


@fast
@given(
    seed=seeds,
    n=st.integers(1, 40),
    encoding=st.sampled_from(["zero_one", "signs"]),
    temperature=st.floats(0.05, 100.0),
    reduction=st.sampled_from(REDUCTIONS),
)
def test_tau_bce_matches_deel(seed, n, encoding, temperature, reduction):
    """TauBCEWithLogitsLoss(temperature) = deel TauBCEWithLogitsLoss(tau=temperature)."""
    outputs, target = binary_batch(seed, max(n, 2), encoding)
    ours = losses.TauBCEWithLogitsLoss(temperature, reduction=reduction)(outputs, target)
    theirs = torchlip.TauBCEWithLogitsLoss(temperature, reduction=reduction)(outputs, target)
    if reduction == "none":
        theirs = theirs[:, 0]
    torch.testing.assert_close(ours, theirs)


def test_hkr_extremes_are_hinge_and_kr():
    """alpha_kr = inf is the hinge alone, alpha_kr = 0 the KR loss alone; the weights of a
    finite alpha_kr are alpha_kr / (1 + alpha_kr) and 1 / (1 + alpha_kr)."""
    outputs, target = binary_batch(0, 30, "zero_one")
    hinge = losses.HingeMarginLoss(0.4)(outputs, target)
    kr = losses.KRLoss()(outputs, target)
    torch.testing.assert_close(losses.HKRLoss(math.inf, 0.4)(outputs, target), hinge)
    torch.testing.assert_close(losses.HKRLoss(0.0, 0.4)(outputs, target), kr)
    torch.testing.assert_close(
        losses.HKRLoss(9.0, 0.4)(outputs, target), 0.9 * hinge + 0.1 * kr, rtol=1e-12, atol=1e-12
    )


def test_kr_loss_is_the_negative_class_mean_gap():
    outputs = torch.tensor([3.0, 1.0, -2.0, 0.5, -0.5])
    target = torch.tensor([1, 1, 0, 0, 0])
    expected = -((3.0 + 1.0) / 2 - (-2.0 + 0.5 - 0.5) / 3)
    torch.testing.assert_close(losses.KRLoss()(outputs, target), torch.tensor(expected))


# --------------------------------------------------------------------------- multiclass


@fast
@given(
    seed=seeds,
    n=st.integers(1, 40),
    classes=st.integers(2, 12),
    one_hot=st.booleans(),
    alpha_kr=alphas,
    margin=margins,
    reduction=st.sampled_from(REDUCTIONS),
)
def test_multiclass_losses_match_deel(seed, n, classes, one_hot, alpha_kr, margin, reduction):
    """MulticlassHKRLoss(alpha_kr, margin) = deel HKRMulticlassLoss(alpha_kr / (1 + alpha_kr),
    min_margin=margin) on one-hot targets; MulticlassKRLoss = -deel KRMulticlassLoss;
    MulticlassHingeLoss(margin) = deel HingeMulticlassLoss(min_margin=margin)."""
    outputs, labels = multiclass_batch(seed, n, classes)
    deel_target = F.one_hot(labels, classes).double()
    target = deel_target if one_hot else labels
    pairs = [
        (
            losses.MulticlassHKRLoss(alpha_kr, margin, reduction=reduction),
            torchlip.HKRMulticlassLoss(deel_alpha(alpha_kr), margin, reduction=reduction),
            1.0,
        ),
        (
            losses.MulticlassKRLoss(reduction=reduction),
            torchlip.KRMulticlassLoss(reduction=reduction),
            -1.0,
        ),
        (
            losses.MulticlassHingeLoss(margin, reduction=reduction),
            torchlip.HingeMulticlassLoss(margin, reduction=reduction),
            1.0,
        ),
    ]
    for ours, theirs, sign in pairs:
        expected = sign * theirs(outputs, deel_target)
        torch.testing.assert_close(ours(outputs, target), expected, msg=repr(ours))


@fast
@given(
    seed=seeds,
    n=st.integers(1, 40),
    classes=st.integers(2, 12),
    alpha_kr=alphas,
    margin=margins,
    temperature=st.floats(0.01, 200.0),
    reduction=st.sampled_from(REDUCTIONS),
)
def test_soft_hkr_matches_deel(seed, n, classes, alpha_kr, margin, temperature, reduction):
    """MulticlassSoftHKRLoss(alpha_kr, margin, temperature) = deel SoftHKRMulticlassLoss(
    alpha=alpha_kr / (1 + alpha_kr), min_margin=margin, temperature=temperature, alpha_mean=1)
    (alpha_mean=1 freezes deel's adaptive temperature at exactly `temperature`)."""
    outputs, labels = multiclass_batch(seed, n, classes)
    theirs = torchlip.SoftHKRMulticlassLoss(
        alpha=deel_alpha(alpha_kr),
        min_margin=margin,
        alpha_mean=1.0,
        temperature=temperature,
        reduction=reduction,
    )
    ours = losses.MulticlassSoftHKRLoss(alpha_kr, margin, temperature, reduction=reduction)
    expected = theirs(outputs, F.one_hot(labels, classes).double())
    # deel stores alpha and the temperature as float32 tensors: float32 tolerances.
    torch.testing.assert_close(ours(outputs, labels), expected, rtol=1e-4, atol=1e-5)


@fast
@given(
    seed=seeds,
    n=st.integers(1, 40),
    classes=st.integers(2, 12),
    one_hot=st.booleans(),
    temperature=st.floats(0.05, 100.0),
    reduction=st.sampled_from(REDUCTIONS),
)
def test_tau_cross_entropy_matches_deel(seed, n, classes, one_hot, temperature, reduction):
    """TauCrossEntropyLoss(temperature) = deel TauCrossEntropyLoss(tau=temperature)."""
    outputs, labels = multiclass_batch(seed, n, classes)
    target = F.one_hot(labels, classes) if one_hot else labels
    ours = losses.TauCrossEntropyLoss(temperature, reduction=reduction)(outputs, target)
    theirs = torchlip.TauCrossEntropyLoss(temperature, reduction=reduction)(outputs, labels)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("margin", [0.05, 0.3, 1.0, 2.12132])
@pytest.mark.parametrize("paper_temperature", [0.01, 0.25, 1.0, 4.0])
@pytest.mark.parametrize("classes", [2, 10])
def test_offset_cross_entropy_matches_orthogonium(margin, paper_temperature, classes):
    """OffsetCrossEntropyLoss(margin, temperature) = orthogonium LossXent(offset=margin,
    temperature=1 / temperature), in float64, to 1e-6."""
    from orthogonium.losses import LossXent

    outputs, labels = multiclass_batch(int(100 * margin + classes), 64, classes)
    theirs = LossXent(classes, offset=margin, temperature=paper_temperature)(outputs, labels)
    ours = losses.OffsetCrossEntropyLoss(margin, temperature=1.0 / paper_temperature)
    for target in (labels, F.one_hot(labels, classes)):
        torch.testing.assert_close(ours(outputs, target), theirs, rtol=0.0, atol=1e-6)


@fast
@given(
    seed=seeds,
    n=st.integers(1, 40),
    classes=st.integers(2, 12),
    margin=margins,
    temperature=st.floats(0.05, 100.0),
)
def test_offset_cross_entropy_is_tau_ce_of_the_offset_logits(seed, n, classes, margin, temperature):
    outputs, labels = multiclass_batch(seed, n, classes)
    shifted = outputs - margin * F.one_hot(labels, classes).double()
    ours = losses.OffsetCrossEntropyLoss(margin, temperature, reduction="none")(outputs, labels)
    tau_ce = losses.TauCrossEntropyLoss(temperature, reduction="none")(shifted, labels)
    torch.testing.assert_close(ours, tau_ce)


@fast
@given(seed=seeds, n=st.integers(1, 40), margin=margins, temperature=st.floats(0.05, 100.0))
def test_two_class_offset_cross_entropy_is_the_binary_one_of_the_logit_difference(
    seed, n, margin, temperature
):
    outputs, labels = multiclass_batch(seed, n, 2)
    multiclass = losses.OffsetCrossEntropyLoss(margin, temperature, reduction="none")
    binary = losses.OffsetBCEWithLogitsLoss(margin, temperature, reduction="none")
    difference = outputs[:, 1] - outputs[:, 0]
    torch.testing.assert_close(multiclass(outputs, labels), binary(difference, labels))


@fast
@given(
    seed=seeds,
    n=st.integers(2, 40),
    encoding=st.sampled_from(["zero_one", "signs"]),
    margin=margins,
    temperature=st.floats(0.05, 1e4),
)
def test_binary_offset_cross_entropy_bounds_its_hinge_limit(seed, n, encoding, margin, temperature):
    """relu(m - y f) <= loss <= relu(m - y f) + log(2) / tau: it decreases to the hinge as the
    temperature grows, and never falls below it."""
    outputs, target = binary_batch(seed, n, encoding)
    signs = torch.where(target > 0, 1.0, -1.0).double().flatten()
    hinge = F.relu(margin - signs * outputs.flatten())
    loss = losses.OffsetBCEWithLogitsLoss(margin, temperature, reduction="none")(outputs, target)
    assert loss.shape == (n,)
    assert (loss >= hinge - 1e-12).all()
    assert (loss <= hinge + math.log(2.0) / temperature + 1e-12).all()
    larger = losses.OffsetBCEWithLogitsLoss(margin, 2.0 * temperature, reduction="none")
    assert (larger(outputs, target) <= loss + 1e-12).all()


@pytest.mark.parametrize("margin", [0.1, 0.5, 2.0])
def test_binary_offset_cross_entropy_tends_to_the_hinge_at_large_temperatures(margin):
    outputs, target = binary_batch(7, 64, "zero_one")
    signs = 2.0 * target.flatten() - 1.0
    hinge = F.relu(margin - signs * outputs.flatten())
    taus = (1.0, 10.0, 1e3, 1e6)
    gaps = [
        (losses.OffsetBCEWithLogitsLoss(margin, tau, reduction="none")(outputs, target) - hinge)
        .abs()
        .max()
        for tau in taus
    ]
    assert gaps[0] > gaps[1] > 0.0
    assert all(gap <= math.log(2.0) / tau + 1e-12 for gap, tau in zip(gaps, taus, strict=True))
    assert gaps[-1] < 1e-6


def test_binary_offset_cross_entropy_values_and_encodings():
    """softplus(-tau (y f - m)) / tau at hand-computed points, same for {0, 1} and {-1, +1}."""
    f = torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64)
    loss = losses.OffsetBCEWithLogitsLoss(margin=0.5, temperature=2.0, reduction="none")
    expected = torch.tensor(
        [
            math.log1p(math.exp(-2 * 0.5)) / 2,
            math.log1p(math.exp(-2 * 0.0)) / 2,
            math.log1p(math.exp(-2 * (-0.7))) / 2,
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(loss(f, torch.tensor([1, 0, 0])), expected)
    torch.testing.assert_close(loss(f[:, None], torch.tensor([[1.0], [-1.0], [-1.0]])), expected)


def test_cosine_similarity_loss_values():
    """deel-torchlip has no cosine loss: checked against 1 - f_y / ||f||."""
    outputs = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0], [1.0, 1.0, 1.0]])
    target = torch.tensor([1, 2, 0])
    expected = torch.tensor([1.0 - 4.0 / 5.0, 2.0, 1.0 - 1.0 / math.sqrt(3.0)])
    loss = losses.CosineSimilarityLoss(reduction="none")(outputs, target)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    "loss",
    [
        losses.MulticlassKRLoss(),
        losses.MulticlassHingeLoss(0.5),
        losses.MulticlassHKRLoss(10.0, 0.5),
        losses.MulticlassSoftHKRLoss(10.0, 0.5, 20.0),
        losses.TauCrossEntropyLoss(5.0),
        losses.OffsetCrossEntropyLoss(0.5, 4.0),
        losses.CosineSimilarityLoss(),
    ],
    ids=repr,
)
def test_multiclass_gradients_are_finite(loss):
    outputs, labels = multiclass_batch(3, 16, 10)
    outputs = outputs.float().requires_grad_()
    loss(outputs, labels).backward()
    assert torch.isfinite(outputs.grad).all()
    assert outputs.grad.abs().sum() > 0


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
@pytest.mark.parametrize(
    "build",
    [
        lambda v: losses.HingeMarginLoss(margin=v),
        lambda v: losses.HKRLoss(alpha_kr=1.0, margin=v),
        lambda v: losses.MulticlassHingeLoss(margin=v),
        lambda v: losses.MulticlassHKRLoss(alpha_kr=1.0, margin=v),
        lambda v: losses.MulticlassSoftHKRLoss(alpha_kr=1.0, margin=v),
        lambda v: losses.OffsetCrossEntropyLoss(margin=v),
        lambda v: losses.OffsetBCEWithLogitsLoss(margin=v),
    ],
)
def test_bad_margin_is_rejected(build, value):
    with pytest.raises(ValueError, match="margin must be a finite number > 0"):
        build(value)


@pytest.mark.parametrize("value", [0.0, -2.0, math.nan, math.inf])
@pytest.mark.parametrize(
    "build",
    [
        lambda v: losses.TauCrossEntropyLoss(temperature=v),
        lambda v: losses.TauBCEWithLogitsLoss(temperature=v),
        lambda v: losses.MulticlassSoftHKRLoss(temperature=v),
        lambda v: losses.OffsetCrossEntropyLoss(temperature=v),
        lambda v: losses.OffsetBCEWithLogitsLoss(temperature=v),
    ],
)
def test_bad_temperature_is_rejected(build, value):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        build(value)


@pytest.mark.parametrize("value", [-0.5, math.nan, -math.inf])
@pytest.mark.parametrize(
    "build", [losses.HKRLoss, losses.MulticlassHKRLoss, losses.MulticlassSoftHKRLoss]
)
def test_bad_alpha_kr_is_rejected(build, value):
    with pytest.raises(ValueError, match="alpha_kr must be >= 0"):
        build(alpha_kr=value)


def test_bad_reduction_is_rejected():
    with pytest.raises(ValueError, match="reduction must be one of"):
        losses.KRLoss(reduction="avg")


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(4,\)"):
        losses.MulticlassHKRLoss()(torch.zeros(5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(5, 4\)"):
        losses.MulticlassHingeLoss()(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"\(6, 1\).*\(5,\)"):
        losses.HKRLoss()(torch.zeros(6, 1), torch.ones(5))


def test_wrong_head_size_is_rejected():
    with pytest.raises(ValueError, match="binary outputs must have shape"):
        losses.HKRLoss()(torch.zeros(4, 3), torch.ones(4))
    with pytest.raises(ValueError, match="multiclass outputs must have shape"):
        losses.MulticlassHKRLoss()(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("bad", [[0, 3], [-1, 1]])
def test_class_index_out_of_range_is_rejected(bad):
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\] for 3 classes"):
        losses.TauCrossEntropyLoss()(torch.zeros(2, 3), torch.tensor(bad))


def test_bad_targets_are_rejected():
    with pytest.raises(ValueError, match="integer dtype"):
        losses.MulticlassKRLoss()(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="exactly one positive entry"):
        losses.MulticlassKRLoss()(torch.zeros(2, 3), torch.tensor([[1, 1, 0], [0, 0, 1]]))
    with pytest.raises(ValueError, match=r"all be in \{0, 1\} or all in \{-1, \+1\}"):
        losses.HingeMarginLoss()(torch.zeros(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"all be in \{0, 1\} or all in \{-1, \+1\}"):
        losses.KRLoss()(torch.zeros(3), torch.tensor([0, 1, -1]))
