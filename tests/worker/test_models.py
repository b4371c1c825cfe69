"""Model zoo and loss registry: architectures, certificate modes, defaults, clear errors."""

from __future__ import annotations

import pytest
import torch

from liptune import losses
from liptune.export import lipschitz_upper_bound
from liptune.nn import (
    FrobeniusLinear,
    GroupSort2,
    InvertibleDownSampling,
    LipschitzResidual,
    LipschitzSequential,
    MaxMin,
    ScaledL2NormPool2d,
    SpectralConv2d,
    SpectralLinear,
)
from worker.spec import (
    FAMILY_PARAMS,
    LOSS_FAMILIES,
    ConvNetSpec,
    LossSpec,
    MLPSpec,
    ResNetSpec,
)
from worker.trial._losses import LOSSES, build_loss
from worker.trial._models import MODELS, build_model

torch.set_num_threads(1)

CASES = [
    (MLPSpec(), (1, 8, 8), 10, "global", (10,)),
    (MLPSpec(head="classwise"), (1, 8, 8), 10, "classwise", (10,)),
    (MLPSpec(widths=[16]), (2,), 2, "binary", (1,)),
    (ConvNetSpec(), (1, 28, 28), 10, "global", (10,)),
    (ConvNetSpec(pooling="invertible", channels=[4, 8]), (3, 8, 8), 10, "global", (10,)),
    (ResNetSpec(head="classwise"), (1, 8, 8), 10, "classwise", (10,)),
    (ResNetSpec(activation="maxmin", channels=[4]), (3, 8, 8), 2, "binary", (1,)),
    (ResNetSpec(pooling="invertible", channels=[4, 8], conv="aol"), (1, 8, 8), 10, "global", (10,)),
]


@pytest.mark.parametrize(("spec", "input_shape", "num_classes", "mode", "output"), CASES)
def test_zoo_builds_one_lipschitz_models_with_the_head_s_mode(
    spec, input_shape, num_classes, mode, output
):
    torch.manual_seed(0)
    model = build_model(spec, input_shape, num_classes)
    assert isinstance(model, LipschitzSequential)
    assert model.certificate_mode == mode
    assert model(torch.rand(3, *input_shape)).shape == (3, *output)
    assert lipschitz_upper_bound(model, input_shape) <= 1.0 + 1e-3


def test_heads_follow_the_task_and_the_spec():
    assert isinstance(build_model(MLPSpec(), (4,), 2)[-1], FrobeniusLinear)
    classwise = build_model(MLPSpec(head="classwise"), (4,), 5)[-1]
    assert isinstance(classwise, FrobeniusLinear) and classwise.disjoint
    assert isinstance(build_model(MLPSpec(), (4,), 5)[-1], SpectralLinear)


def test_conv_nets_default_to_invertible_pooling():
    """The measured default (benchmarks/README.md, convolution families): space-to-depth keeps
    the gradient norm the certificates need, where l2 pooling loses some."""
    assert ConvNetSpec().pooling == ResNetSpec().pooling == "invertible"
    torch.manual_seed(0)
    model = build_model(ConvNetSpec(), (1, 28, 28), 10)
    assert sum(isinstance(layer, InvertibleDownSampling) for layer in model) == 2
    convs = [layer for layer in model if isinstance(layer, SpectralConv2d)]
    dense = [layer for layer in model if isinstance(layer, SpectralLinear)]
    # 1->16, space-to-depth (64 channels), 64->32, space-to-depth (128 x 7 x 7), 6272->64->10
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 16), (64, 32)]
    assert [(d.in_features, d.out_features) for d in dense] == [(6272, 64), (64, 10)]
    resnet = build_model(ResNetSpec(), (1, 8, 8), 10)
    assert any(isinstance(layer, InvertibleDownSampling) for layer in resnet)


def test_guideline_defaults_groupsort2_l2_pooling_orthogonal_init():
    torch.manual_seed(0)
    model = build_model(ConvNetSpec(pooling="l2"), (1, 28, 28), 10)
    kinds = [type(layer) for layer in model]
    assert GroupSort2 in kinds and ScaledL2NormPool2d in kinds
    # The reference Fashion-MNIST network: 1->16, pool, 16->32, pool, 1568->64, 64->10.
    convs = [layer for layer in model if isinstance(layer, SpectralConv2d)]
    dense = [layer for layer in model if isinstance(layer, SpectralLinear)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 16), (16, 32)]
    assert [(d.in_features, d.out_features) for d in dense] == [(1568, 64), (64, 10)]
    free = dense[0].parametrizations.weight.original.detach()  # before the constraint
    torch.testing.assert_close(free @ free.T, torch.eye(64), atol=1e-5, rtol=0)


def test_maxmin_doubles_the_channels_that_follow():
    model = build_model(MLPSpec(activation="maxmin", widths=[8, 4]), (3,), 10)
    dense = [layer for layer in model if isinstance(layer, SpectralLinear)]
    assert [(d.in_features, d.out_features) for d in dense] == [(3, 8), (16, 4), (8, 10)]
    assert sum(isinstance(layer, MaxMin) for layer in model) == 2


def test_resnet_blocks_are_mean_residuals():
    model = build_model(ResNetSpec(blocks_per_stage=2), (1, 8, 8), 10)
    blocks = [layer for layer in model if isinstance(layer, LipschitzResidual)]
    assert len(blocks) == 4 and all(block.mode == "mean" for block in blocks)


def test_architecture_errors_name_the_field():
    with pytest.raises(ValueError, match=r"model\.widths\[1\] = 7.*groupsort2.*multiple of 2"):
        build_model(MLPSpec(widths=[8, 7]), (4,), 10)
    with pytest.raises(ValueError, match=r"use model `mlp`"):
        build_model(ConvNetSpec(), (2,), 2)
    with pytest.raises(ValueError, match=r"stage 3 receives 1x1"):
        build_model(ConvNetSpec(channels=[4, 4, 4, 4]), (1, 8, 8), 10)
    with pytest.raises(ValueError, match=r"needs even feature maps"):
        build_model(ConvNetSpec(channels=[4, 4], pooling="invertible"), (1, 6, 6), 10)


def test_model_registry_matches_the_spec_classes():
    assert set(MODELS) == {"mlp", "convnet", "resnet"}
    for name, info in MODELS.items():
        assert info.spec_class().name == name and info.description


@pytest.mark.parametrize(
    ("family", "task", "expected"),
    [
        ("hkr", "binary", losses.HKRLoss),
        ("hkr", "multiclass", losses.MulticlassHKRLoss),
        ("soft_hkr", "multiclass", losses.MulticlassSoftHKRLoss),
        ("tau_ce", "binary", losses.TauBCEWithLogitsLoss),
        ("tau_ce", "multiclass", losses.TauCrossEntropyLoss),
        ("offset_ce", "binary", losses.OffsetBCEWithLogitsLoss),
        ("offset_ce", "multiclass", losses.OffsetCrossEntropyLoss),
        ("hinge", "binary", losses.HingeMarginLoss),
        ("hinge", "multiclass", losses.MulticlassHingeLoss),
        ("kr", "binary", losses.KRLoss),
        ("kr", "multiclass", losses.MulticlassKRLoss),
        ("cosine", "multiclass", losses.CosineSimilarityLoss),
    ],
)
def test_build_loss_picks_the_task_variant(family, task, expected):
    assert type(build_loss(LossSpec(family=family), task)) is expected


def test_build_loss_passes_the_spec_values_and_defaults():
    loss = build_loss(LossSpec(family="soft_hkr", margin=0.3, alpha_kr=float("inf")), "multiclass")
    assert loss.margin == 0.3 and loss.hinge_weight == 1.0
    assert loss.temperature == LOSSES["soft_hkr"].params["temperature"].default
    assert build_loss(LossSpec(family="tau_ce", temperature=4.0), "binary").temperature == 4.0
    offset = build_loss(LossSpec(family="offset_ce", margin=0.7, temperature=4.0), "multiclass")
    assert (offset.margin, offset.temperature) == (0.7, 4.0)


@pytest.mark.parametrize("family", ["soft_hkr", "cosine"])
def test_multiclass_only_families_refuse_binary_tasks(family):
    with pytest.raises(ValueError, match=rf"{family}' has no binary variant.*'hkr'"):
        build_loss(LossSpec(family=family), "binary")


def test_loss_registry_describes_every_family():
    assert set(LOSSES) == set(LOSS_FAMILIES)
    for family, info in LOSSES.items():
        assert tuple(info.params) == FAMILY_PARAMS[family]
        assert info.description and "multiclass" in info.tasks
        for param in info.params.values():
            assert param.low < param.default < param.high
