"""Tests of liptune.export: plain-PyTorch export, ONNX export, the independent Lipschitz bound."""

import math
import pickle

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from pydantic import TypeAdapter
from torch import nn

from liptune.certify import certificates
from liptune.export import export_onnx, lipschitz_upper_bound, vanilla_export
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
    SLLConv2d,
    SpectralConv2d,
    SpectralLinear,
)
from liptune.onnx import UnsupportedModule, to_onnx
from worker.spec import ModelSpec
from worker.trial._models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def classifier(certificate_mode: str | None = None) -> LipschitzSequential:
    return LipschitzSequential(
        SpectralConv2d(1, 8, 3, padding="same", padding_mode="circular"),
        GroupSort2(),
        ScaledL2NormPool2d(2),
        LipschitzResidual(SpectralConv2d(8, 8, 3, padding=1), mode="convex"),
        HouseHolder(8),
        InvertibleDownSampling(2),
        ScaledConcat(SpectralConv2d(32, 4, 1), SpectralConv2d(32, 4, 3, padding=1)),
        ScaledGlobalL2NormPool2d(),
        nn.Flatten(),
        OrthoLinear(8, 16),
        GroupSort2(),
        SpectralLinear(16, 16),
        FrobeniusLinear(16, 10, disjoint=certificate_mode == "classwise"),
        certificate_mode=certificate_mode,
    )


def trained(model: nn.Module, steps: int = 3) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.rand(8, 1, 8, 8)).logsumexp(dim=1).sum().backward()
        optimizer.step()
    return model


def test_vanilla_export_is_plain_same_outputs_and_leaves_the_model_alone():
    model = trained(classifier("classwise"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    exported = vanilla_export(model)
    kinds = {type(m) for m in exported.modules()}
    assert nn.Linear in kinds and nn.Conv2d in kinds
    assert not {SpectralConv2d, SpectralLinear, OrthoLinear, FrobeniusLinear} & kinds
    assert not any("parametrizations" in name for name, _ in exported.named_parameters())
    assert exported.certificate_mode == "classwise"
    assert not exported.training
    assert exported[0].padding_mode == "circular"
    x = torch.rand(6, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(exported(x), model(x), atol=1e-6)
    # Exporting a model in training mode takes no power-iteration step on it.
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_exported_model_pickles_and_keeps_its_outputs():
    model = trained(classifier()).eval()
    exported = vanilla_export(model)
    restored = pickle.loads(pickle.dumps(exported))
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(restored(x), exported(x))
    assert restored.certificate_mode == "global"


def test_exported_single_layer_is_plain():
    layer = SpectralConv2d(2, 3, 3, stride=2, padding=1).eval()
    plain = vanilla_export(layer)
    assert type(plain) is nn.Conv2d
    assert plain.stride == (2, 2)
    x = torch.randn(1, 2, 7, 7)
    with torch.no_grad():
        assert torch.allclose(plain(x), layer(x))


def onnx_outputs_match(model: nn.Module, input_shape: tuple[int, ...], path) -> onnx.ModelProto:
    """Export ``model``, check the file, and compare onnxruntime with PyTorch at batch 1, 2, 7."""
    model.eval()
    export_onnx(model, path, input_shape)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["output"]
    assert session.get_inputs()[0].shape == ["batch", *input_shape]
    for batch in (1, 2, 7):
        # Both signs, to reach both sides of the activations' kinks.
        x = 2 * torch.rand(batch, *input_shape) - 1
        (out,) = session.run(None, {"input": x.cpu().numpy()})
        with torch.no_grad():
            expected = model(x).cpu().numpy()
        assert out.shape == expected.shape
        np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    return proto


def perturbed(model: nn.Module) -> nn.Module:
    """``model`` with random biases, angles and skip weights (the defaults start at 0 or pi/4)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def written_directly(proto: onnx.ModelProto) -> bool:
    return proto.producer_name == "liptune"


def test_onnx_export_runs_in_onnxruntime_with_the_same_outputs(tmp_path):
    model = trained(classifier("classwise"))
    proto = onnx_outputs_match(model, (1, 8, 8), tmp_path / "model.onnx")
    assert written_directly(proto)
    assert proto.opset_import[0].version == 18
    properties = {p.key: p.value for p in proto.metadata_props}
    assert properties == {"liptune.certificate_mode": "classwise"}


class Doubled(nn.Module):
    def forward(self, input):
        return 2 * torch.tanh(input)


def conv(*args, **kwargs) -> nn.Module:
    return perturbed(nn.Conv2d(*args, **kwargs))


MODULES = {
    "linear": (lambda: nn.Linear(5, 3), (5,)),
    "linear-no-bias-rank-3": (lambda: nn.Linear(5, 3, bias=False), (4, 5)),
    "conv-zeros-stride-2": (lambda: conv(3, 4, 3, stride=2, padding=1), (3, 9, 8)),
    "conv-same-even-kernel": (lambda: conv(3, 4, (2, 4), padding="same"), (3, 7, 9)),
    "conv-circular": (
        lambda: conv(2, 4, 3, padding=(1, 2), padding_mode="circular", bias=False),
        (2, 6, 7),
    ),
    "conv-circular-same": (
        lambda: conv(2, 2, 4, padding="same", padding_mode="circular"),
        (2, 8, 8),
    ),
    "conv-reflect-dilated": (
        lambda: conv(2, 4, 3, padding=2, dilation=2, padding_mode="reflect"),
        (2, 7, 7),
    ),
    "conv-replicate-groups": (
        lambda: conv(4, 6, 3, padding=1, groups=2, padding_mode="replicate"),
        (4, 5, 5),
    ),
    "groupsort-4": (lambda: GroupSort(4), (8, 3, 3)),
    "groupsort2-dense": (lambda: GroupSort2(), (6,)),
    "groupsort2-image": (lambda: GroupSort2(), (4, 3, 5)),
    "fullsort": (lambda: FullSort(), (5, 2, 3)),
    "maxmin": (lambda: MaxMin(), (3, 4, 4)),
    "householder": (lambda: perturbed(HouseHolder(6)), (6, 3, 2)),
    "householder-dense": (lambda: perturbed(HouseHolder(4)), (4,)),
    "l2-pool-odd-size": (lambda: ScaledL2NormPool2d(2), (3, 7, 6)),
    "l2-pool-2x3": (lambda: ScaledL2NormPool2d((2, 3)), (2, 6, 6)),
    "avg-pool": (lambda: ScaledAvgPool2d(2), (3, 7, 6)),
    "global-l2-pool": (lambda: ScaledGlobalL2NormPool2d(), (3, 5, 4)),
    "global-avg-pool": (lambda: ScaledGlobalAvgPool2d(), (3, 5, 4)),
    "invertible-down-sampling-2": (lambda: InvertibleDownSampling(2), (3, 4, 6)),
    "invertible-down-sampling-3": (lambda: InvertibleDownSampling(3), (2, 6, 3)),
    "residual-convex": (
        lambda: perturbed(LipschitzResidual(nn.Linear(6, 6), mode="convex")),
        (6,),
    ),
    "residual-mean": (lambda: LipschitzResidual(conv(2, 2, 3, padding=1), mode="mean"), (2, 5, 5)),
    "sll": (lambda: perturbed(SLLConv2d(3, 5, 3)), (3, 5, 6)),
    "sll-kernel-3x5": (lambda: perturbed(SLLConv2d(2, 2, (3, 5))), (2, 6, 4)),
    "concat-3": (
        lambda: ScaledConcat(nn.Identity(), conv(2, 3, 1), conv(2, 1, 3, padding=1)),
        (2, 4, 4),
    ),
    "flatten-identity-dropout-relu": (
        lambda: nn.Sequential(nn.Flatten(), nn.Identity(), nn.Dropout(0.5), nn.ReLU()),
        (2, 3, 3),
    ),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_is_written_directly_with_the_same_outputs(name, tmp_path):
    factory, input_shape = MODULES[name]
    input_shape = tuple(input_shape)
    proto = onnx_outputs_match(factory(), input_shape, tmp_path / "model.onnx")
    assert written_directly(proto)


ZOO = {
    "mlp": ({"name": "mlp", "widths": [16, 12]}, (1, 8, 8), 10),
    "mlp-binary-vector": ({"name": "mlp", "widths": [8]}, (2,), 2),
    "convnet-l2": ({"name": "convnet", "channels": [4, 8], "dense_widths": [16]}, (1, 8, 8), 10),
    "convnet-avg-classwise": (
        {"name": "convnet", "channels": [4], "pooling": "avg", "head": "classwise"},
        (1, 8, 8),
        10,
    ),
    "convnet-invertible-groupsort-4": (
        {
            "name": "convnet",
            "channels": [4, 8],
            "pooling": "invertible",
            "activation": "groupsort",
            "group_size": 4,
        },
        (3, 8, 8),
        10,
    ),
    "convnet-fullsort": (
        {"name": "convnet", "channels": [4], "activation": "fullsort"},
        (1, 8, 8),
        10,
    ),
    "convnet-maxmin": ({"name": "convnet", "channels": [3], "activation": "maxmin"}, (1, 8, 8), 5),
    "resnet-sll-invertible": (
        {"name": "resnet", "channels": [4], "block": "sll", "pooling": "invertible"},
        (1, 8, 8),
        10,
    ),
    "resnet-householder": (
        {"name": "resnet", "channels": [4, 6], "activation": "householder"},
        (1, 8, 8),
        10,
    ),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_networks_are_written_directly_with_the_same_outputs(name, tmp_path):
    spec, input_shape, classes = ZOO[name]
    model = perturbed(
        build_model(TypeAdapter(ModelSpec).validate_python(spec), input_shape, classes)
    )
    proto = onnx_outputs_match(model, input_shape, tmp_path / "model.onnx")
    assert written_directly(proto)


def test_circular_padding_network_is_written_directly(tmp_path):
    model = perturbed(
        LipschitzSequential(
            SpectralConv2d(2, 4, 3, padding="same", padding_mode="circular"),
            GroupSort2(),
            SpectralConv2d(4, 4, 3, stride=2, padding=1, padding_mode="circular"),
            ScaledGlobalAvgPool2d(),
            nn.Flatten(),
            SpectralLinear(4, 3),
        )
    )
    assert written_directly(onnx_outputs_match(model, (2, 6, 6), tmp_path / "model.onnx"))


def test_a_higher_opset_is_honoured(tmp_path):
    model = trained(classifier())
    path = export_onnx(model, tmp_path / "model.onnx", (1, 8, 8), opset_version=20)
    proto = onnx.load(str(path))
    assert written_directly(proto)
    assert proto.opset_import[0].version == 20
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 1, 8, 8)
    (out,) = session.run(None, {"input": x.cpu().numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model.eval()(x).cpu().numpy(), atol=1e-5)


def test_an_unknown_module_falls_back_to_the_torch_exporter(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), Doubled(), GroupSort2(), nn.Linear(6, 2))
    with pytest.raises(UnsupportedModule, match=r"test_export\.Doubled"):
        to_onnx(vanilla_export(model), torch.rand(1, 4))
    proto = onnx_outputs_match(model, (4,), tmp_path / "model.onnx")
    assert not written_directly(proto)


def binary_head() -> LipschitzSequential:
    return LipschitzSequential(
        nn.Flatten(),
        SpectralLinear(64, 8),
        GroupSort2(),
        SpectralLinear(8, 1),
        certificate_mode="binary",
    )


def radius_matches(model: nn.Module, input_shape: tuple[int, ...], path) -> onnx.ModelProto:
    """The ONNX graph's ``radius`` output equals liptune.certify's certificate at L = 1.3."""
    export_onnx(model, path, input_shape, lipschitz=1.3)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()] == ["output", "radius"]
    x = torch.rand(5, *input_shape)
    output, radius = session.run(None, {"input": x.cpu().numpy()})
    with torch.no_grad():
        logits = vanilla_export(model)(x)
    expected = certificates(logits, model.certificate_mode, lipschitz=1.3).cpu().numpy()
    assert radius.shape == (5,)
    np.testing.assert_allclose(output, logits.cpu().numpy(), atol=1e-5)
    np.testing.assert_allclose(radius, expected, rtol=1e-5, atol=1e-6)
    return onnx.load(str(path))


@pytest.mark.parametrize("mode", ["global", "classwise", "binary"])
def test_the_graph_computes_each_input_s_certified_radius(tmp_path, mode):
    model = trained(binary_head() if mode == "binary" else classifier(mode))
    proto = radius_matches(model, (1, 8, 8), tmp_path / "model.onnx")
    assert written_directly(proto)
    properties = {p.key: p.value for p in proto.metadata_props}
    assert properties == {"liptune.certificate_mode": mode, "liptune.lipschitz_bound": "1.3"}


def test_the_torch_exporter_computes_the_radius_too(tmp_path):
    model = LipschitzSequential(
        nn.Linear(4, 6), Doubled(), GroupSort2(), nn.Linear(6, 3), certificate_mode="global"
    )
    assert not written_directly(radius_matches(model, (4,), tmp_path / "model.onnx"))
    with pytest.raises(ValueError, match="certificate_mode"):
        export_onnx(nn.Linear(4, 2), tmp_path / "bare.onnx", (4,), lipschitz=1.0)


def test_writer_refuses_what_it_cannot_write():
    with pytest.raises(UnsupportedModule, match=r"start_dim=2"):
        to_onnx(nn.Flatten(start_dim=2), torch.rand(1, 2, 3, 4))
    with pytest.raises(UnsupportedModule, match=r"torch\.bfloat16"):
        to_onnx(nn.Linear(2, 2).bfloat16(), torch.rand(1, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="opset_version >= 18"):
        to_onnx(nn.Linear(2, 2), torch.rand(1, 2), opset_version=17)


def dense_operator_norm(layer: nn.Module, input_shape: tuple[int, ...]) -> float:
    x = torch.zeros(input_shape, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda z: layer(z.unsqueeze(0)), x)
    return torch.linalg.matrix_norm(jacobian.reshape(-1, x.numel()), 2).item()


@pytest.mark.parametrize(
    ("stride", "padding", "padding_mode"),
    [(1, 1, "zeros"), (2, 1, "zeros"), (1, 2, "circular"), (2, 0, "zeros"), (3, 1, "circular")],
)
def test_conv_bound_is_the_norm_of_the_real_operator(stride, padding, padding_mode):
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, padding_mode=padding_mode)
    conv = conv.double()
    bound = lipschitz_upper_bound(conv, (2, 7, 6))
    assert bound == pytest.approx(dense_operator_norm(conv, (2, 7, 6)), rel=1e-5)


def test_bound_handles_residual_and_concat():
    linear = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(3 * torch.eye(4))
    residual = LipschitzResidual(linear, mode="mean")
    assert lipschitz_upper_bound(residual, (4,)) == pytest.approx((1 + 3) / 2)
    concat = ScaledConcat(linear, nn.Identity())
    assert lipschitz_upper_bound(concat, (4,)) == pytest.approx(math.sqrt((9 + 1) / 2))


def test_bound_of_a_trained_network_is_at_most_1_and_of_a_scaled_one_is_not():
    model = trained(classifier())
    bound = lipschitz_upper_bound(model, (1, 8, 8))
    assert bound <= 1 + 1e-3
    exported = vanilla_export(model)
    with torch.no_grad():
        exported[-1].weight.mul_(1.5 / bound)
    assert lipschitz_upper_bound(exported, (1, 8, 8)) == pytest.approx(1.5, rel=1e-5)


def test_bound_refuses_an_unknown_layer_by_name():
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Tanh(), nn.BatchNorm1d(3)))
    with pytest.raises(TypeError, match=r"'1\.0' of type torch\.nn\.modules\.activation\.Tanh"):
        lipschitz_upper_bound(model, (3,))


def test_bad_input_shape_is_refused():
    with pytest.raises(ValueError, match="one example"):
        lipschitz_upper_bound(classifier(), (0, 8, 8))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        vanilla_export("model")
