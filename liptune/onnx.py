r"""A direct ONNX writer for the plain models of :func:`liptune.export.vanilla_export`.

:func:`to_onnx` walks the module tree and emits one small ONNX subgraph per module, with the
weights as initializers; it needs no tracing, so it takes milliseconds where
``torch.onnx.export`` takes seconds. Each supported module type's emitter is set on its
entry of the one layer-type registry (:data:`liptune.layers.LAYER_TYPES`, with its bound rule);
a module of any other type (or an unsupported setting of a known one) raises
:class:`UnsupportedModule`, on which :func:`liptune.export.export_onnx` falls back to
``torch.onnx.export``.

How the core's modules map to ONNX (``x`` of shape ``(N, C, *)``; ``C``, ``H``, ``W`` are
static, only the batch ``N`` is dynamic):

- ``nn.Linear``: ``Gemm`` (``MatMul`` + ``Add`` on inputs of rank > 2); ``nn.Conv2d``:
  ``Conv``, circular padding as ``Slice`` + ``Concat`` (wrap-around, no opset 19 ``Pad``).
- ``GroupSort(g)``: reshape to ``(N, C/g, g, -1)``, ascending ``TopK`` on the group axis;
  ``GroupSort2`` and ``HouseHolder``: channel pairs ``(2i, 2i+1)`` split from
  ``(N, C/2, 2, -1)``; ``FullSort``: ascending ``TopK`` on the channels;
  ``MaxMin``: ``[Relu(x), Relu(-x)]``.
- ``ScaledL2NormPool2d``: ``LpPool`` with ``p = 2``; ``ScaledAvgPool2d``:
  ``AveragePool`` times :math:`\sqrt{kh\,kw}`; global versions ``GlobalLpPool`` and
  ``ReduceSum`` divided by :math:`\sqrt{HW}`; ``InvertibleDownSampling``: ``Reshape`` to
  ``(N, C, H/k, k, W/k, k)``, ``Transpose`` to ``(N, C, k, k, H/k, W/k)``, ``Reshape``.
- ``LipschitzResidual``: :math:`t x + (1-t) f(x)` with its learned :math:`t` (``mean``:
  :math:`(x + f(x)) / 2`); ``SLLResidual``: ``Conv``, ``Relu``, ``ConvTranspose``, ``Sub``;
  ``ScaledConcat``: ``Concat`` divided by :math:`\sqrt n`.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from liptune.certify import MARGIN_DIVISORS
from liptune.layers import LAYER_TYPES
from liptune.nn import (
    FullSort,
    GroupSort,
    GroupSort2,
    HouseHolder,
    InvertibleDownSampling,
    LipschitzResidual,
    LipschitzSequential,
    MaxMin,
    ScaledAvgPool2d,
    ScaledConcat,
    ScaledGlobalAvgPool2d,
    ScaledGlobalL2NormPool2d,
    ScaledL2NormPool2d,
    SLLResidual,
)

__all__ = ["MIN_OPSET", "UnsupportedModule", "to_onnx"]

MIN_OPSET = 18
"""The lowest opset the writer emits (``Reduce*`` take their axes as an input from 18 on)."""

_INT64_MAX = np.iinfo(np.int64).max
_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


class UnsupportedModule(TypeError):
    """The writer has no emitter for a module of the model (its type or one of its settings)."""


class _Graph:
    """The nodes and initializers being written, and the shapes each module saw in PyTorch."""

    def __init__(self, dtype: torch.dtype, shapes: dict[nn.Module, tuple[int, ...] | None]) -> None:
        if dtype not in _DTYPES:
            raise UnsupportedModule(f"the writer handles float16/32/64 models, not {dtype}")
        self.dtype = np.dtype(_DTYPES[dtype])
        self.shapes = shapes
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def constant(self, value: Any, *, integer: bool = False) -> str:
        """An initializer holding ``value`` (int64 if ``integer``, else the model's dtype)."""
        array = np.asarray(value, dtype=np.int64 if integer else self.dtype)
        name = self._name("const")
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, tensor: Tensor) -> str:
        name = self._name("weight")
        array = tensor.detach().cpu().numpy().astype(self.dtype, copy=False)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(
        self, op: str, inputs: Sequence[str], outputs: int = 1, **attributes: Any
    ) -> list[str]:
        names = [self._name(op) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), names, **attributes))
        return names

    def op(self, op: str, *inputs: str, **attributes: Any) -> str:
        """Add a one-output node ``op(*inputs)`` and return its output's name."""
        return self.node(op, inputs, **attributes)[0]

    def emit(self, module: nn.Module, x: str) -> str:
        """Append the subgraph of ``module`` applied to ``x``; return the output's name."""
        entry = LAYER_TYPES.get(type(module))
        emitter = entry.emitter if entry is not None else None
        if emitter is None:
            raise UnsupportedModule(
                f"no ONNX emitter for {type(module).__module__}.{type(module).__name__}"
            )
        return emitter(self, module, x)

    def input_shape(self, module: nn.Module) -> tuple[int, ...]:
        """The shape of ``module``'s input in PyTorch, batch dimension excluded."""
        shape = self.shapes.get(module)
        if shape is None:
            raise UnsupportedModule(
                f"{type(module).__name__} is called on inputs of several shapes (or never)"
            )
        return shape


_M = TypeVar("_M", bound=nn.Module)


def _emits(
    *types: type[_M],
) -> Callable[[Callable[[_Graph, _M, str], str]], Callable[[_Graph, _M, str], str]]:
    """Set the emitter of the registered layer types ``types`` (:data:`liptune.layers.LAYER_TYPES`;
    it is only ever called with modules of exactly those types)."""

    def register(emitter: Callable[[_Graph, _M, str], str]) -> Callable[[_Graph, _M, str], str]:
        for module_type in types:
            LAYER_TYPES[module_type].emitter = emitter
        return emitter

    return register


# ------------------------------------------------------------------------------ containers


@_emits(nn.Sequential, LipschitzSequential)
def _sequential(graph: _Graph, module: nn.Sequential, x: str) -> str:
    for child in module:
        x = graph.emit(child, x)
    return x


@_emits(nn.Identity, nn.Dropout)
def _identity(graph: _Graph, module: nn.Module, x: str) -> str:
    # Dropout is the identity in eval mode, the mode vanilla_export leaves the model in.
    return graph.op("Identity", x)


@_emits(nn.Flatten)
def _flatten(graph: _Graph, module: nn.Flatten, x: str) -> str:
    rank = 1 + len(graph.input_shape(module))
    if module.start_dim != 1 or module.end_dim not in (-1, rank - 1):
        raise UnsupportedModule(
            f"nn.Flatten(start_dim={module.start_dim}, end_dim={module.end_dim}): the writer "
            "flattens from dim 1 to the end only"
        )
    return graph.op("Flatten", x, axis=1)


# ------------------------------------------------------------------------------ linear maps


@_emits(nn.Linear)
def _linear(graph: _Graph, module: nn.Linear, x: str) -> str:
    bias = [] if module.bias is None else [graph.weight(module.bias)]
    if len(graph.input_shape(module)) == 1:
        return graph.op("Gemm", x, graph.weight(module.weight), *bias, transB=1)
    y = graph.op("MatMul", x, graph.weight(module.weight.T))
    return graph.op("Add", y, *bias) if bias else y


def _wrap(graph: _Graph, x: str, axis: int, before: int, after: int) -> str:
    """Circular padding of ``x`` on ``axis``: its last ``before`` and first ``after`` rows."""
    if not before and not after:
        return x
    axes = graph.constant([axis], integer=True)

    def rows(start: int, end: int) -> str:
        bounds = graph.constant([start], integer=True), graph.constant([end], integer=True)
        return graph.op("Slice", x, *bounds, axes)

    parts = [rows(-before, _INT64_MAX)] if before else []
    parts.append(x)
    if after:
        parts.append(rows(0, after))
    return graph.op("Concat", *parts, axis=axis)


_PAD_MODES = {"reflect": "reflect", "replicate": "edge"}


@_emits(nn.Conv2d)
def _conv2d(graph: _Graph, module: nn.Conv2d, x: str) -> str:
    # (left, right, top, bottom), as F.pad takes it; exact for "same" padding of even kernels.
    left, right, top, bottom = module._reversed_padding_repeated_twice
    pads = [top, left, bottom, right]
    if module.padding_mode == "circular":
        x = _wrap(graph, _wrap(graph, x, 2, top, bottom), 3, left, right)
        pads = [0, 0, 0, 0]
    elif module.padding_mode in _PAD_MODES:
        widths = graph.constant([0, 0, top, left, 0, 0, bottom, right], integer=True)
        x = graph.op("Pad", x, widths, mode=_PAD_MODES[module.padding_mode])
        pads = [0, 0, 0, 0]
    bias = [] if module.bias is None else [graph.weight(module.bias)]
    return graph.op(
        "Conv",
        x,
        graph.weight(module.weight),
        *bias,
        kernel_shape=list(module.kernel_size),
        strides=list(module.stride),
        dilations=list(module.dilation),
        group=module.groups,
        pads=pads,
    )


# ------------------------------------------------------------------------------ activations


def _grouped(graph: _Graph, module: nn.Module, x: str, group_size: int) -> str:
    """``x`` reshaped to ``(N, C / group_size, group_size, -1)``."""
    channels = graph.input_shape(module)[0]
    shape = graph.constant([0, channels // group_size, group_size, -1], integer=True)
    return graph.op("Reshape", x, shape)


def _ungrouped(graph: _Graph, module: nn.Module, grouped: str) -> str:
    """``grouped`` reshaped back to the shape of ``module``'s input."""
    shape = graph.constant([0, *graph.input_shape(module)], integer=True)
    return graph.op("Reshape", grouped, shape)


def _ascending(graph: _Graph, x: str, axis: int, size: int) -> str:
    k = graph.constant([size], integer=True)
    values, _ = graph.node("TopK", [x, k], outputs=2, axis=axis, largest=0, sorted=1)
    return values


@_emits(GroupSort)
def _group_sort(graph: _Graph, module: GroupSort, x: str) -> str:
    grouped = _grouped(graph, module, x, module.group_size)
    return _ungrouped(graph, module, _ascending(graph, grouped, 2, module.group_size))


@_emits(FullSort)
def _full_sort(graph: _Graph, module: FullSort, x: str) -> str:
    return _ascending(graph, x, 1, graph.input_shape(module)[0])


def _pairs(graph: _Graph, module: nn.Module, x: str) -> tuple[str, str]:
    """Channels ``2i`` and ``2i+1`` of ``x``, each ``(N, C/2, 1, -1)``."""
    first, second = graph.node(
        "Split", [_grouped(graph, module, x, 2)], outputs=2, axis=2, num_outputs=2
    )
    return first, second


@_emits(GroupSort2)
def _group_sort2(graph: _Graph, module: GroupSort2, x: str) -> str:
    first, second = _pairs(graph, module, x)
    low, high = graph.op("Min", first, second), graph.op("Max", first, second)
    return _ungrouped(graph, module, graph.op("Concat", low, high, axis=2))


@_emits(HouseHolder)
def _householder(graph: _Graph, module: HouseHolder, x: str) -> str:
    first, second = _pairs(graph, module, x)
    theta = module.theta.detach().reshape(-1, 1, 1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    dot = graph.op(
        "Add",
        graph.op("Mul", first, graph.weight(cos)),
        graph.op("Mul", second, graph.weight(sin)),
    )
    projection = graph.op("Min", dot, graph.constant(0.0))
    reflected = [
        graph.op("Sub", part, graph.op("Mul", projection, graph.weight(2 * direction)))
        for part, direction in ((first, cos), (second, sin))
    ]
    return _ungrouped(graph, module, graph.op("Concat", *reflected, axis=2))


@_emits(MaxMin)
def _max_min(graph: _Graph, module: MaxMin, x: str) -> str:
    negative = graph.op("Relu", graph.op("Neg", x))
    return graph.op("Concat", graph.op("Relu", x), negative, axis=1)


@_emits(nn.ReLU)
def _relu(graph: _Graph, module: nn.ReLU, x: str) -> str:
    return graph.op("Relu", x)


# ------------------------------------------------------------------------------ pooling


@_emits(ScaledL2NormPool2d)
def _l2_pool(graph: _Graph, module: ScaledL2NormPool2d, x: str) -> str:
    window = list(module.kernel_size)
    return graph.op("LpPool", x, kernel_shape=window, strides=window, p=2)


@_emits(ScaledAvgPool2d)
def _avg_pool(graph: _Graph, module: ScaledAvgPool2d, x: str) -> str:
    window = list(module.kernel_size)
    average = graph.op("AveragePool", x, kernel_shape=window, strides=window)
    return graph.op("Mul", average, graph.constant(math.sqrt(module.window)))


@_emits(ScaledGlobalL2NormPool2d)
def _global_l2_pool(graph: _Graph, module: ScaledGlobalL2NormPool2d, x: str) -> str:
    return graph.op("GlobalLpPool", x, p=2)


@_emits(ScaledGlobalAvgPool2d)
def _global_avg_pool(graph: _Graph, module: ScaledGlobalAvgPool2d, x: str) -> str:
    _, height, width = graph.input_shape(module)
    total = graph.op("ReduceSum", x, graph.constant([2, 3], integer=True), keepdims=1)
    return graph.op("Div", total, graph.constant(math.sqrt(height * width)))


@_emits(InvertibleDownSampling)
def _invertible_down_sampling(graph: _Graph, module: InvertibleDownSampling, x: str) -> str:
    # Output channel c*k*k + i*k + j holds pixel (i, j) of the blocks of channel c.
    k = module.kernel_size
    channels, height, width = graph.input_shape(module)
    blocks = graph.constant([0, channels, height // k, k, width // k, k], integer=True)
    x = graph.op("Transpose", graph.op("Reshape", x, blocks), perm=[0, 1, 3, 5, 2, 4])
    stacked = graph.constant([0, channels * k * k, height // k, width // k], integer=True)
    return graph.op("Reshape", x, stacked)


# ------------------------------------------------------------------------------ merges


@_emits(LipschitzResidual)
def _residual(graph: _Graph, module: LipschitzResidual, x: str) -> str:
    out = graph.emit(module.block, x)
    if module.mode == "mean":
        return graph.op("Div", graph.op("Add", x, out), graph.constant(2.0))
    t = torch.sigmoid(module.logit.detach())
    skip = graph.op("Mul", x, graph.weight(t))
    return graph.op("Add", skip, graph.op("Mul", out, graph.weight(1 - t)))


@_emits(SLLResidual)
def _sll(graph: _Graph, module: SLLResidual, x: str) -> str:
    conv, transposed = module.conv, module.transposed
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise UnsupportedModule(f"SLLResidual with {conv}: the writer takes numeric zero padding")
    inner = graph.op("Relu", _conv2d(graph, conv, x))
    top, left = cast(tuple[int, int], transposed.padding)
    branch = graph.op(
        "ConvTranspose",
        inner,
        graph.weight(transposed.weight),
        kernel_shape=list(transposed.kernel_size),
        strides=list(transposed.stride),
        dilations=list(transposed.dilation),
        group=transposed.groups,
        pads=[top, left, top, left],
    )
    return graph.op("Sub", x, branch)


@_emits(ScaledConcat)
def _concat(graph: _Graph, module: ScaledConcat, x: str) -> str:
    outputs = [graph.emit(branch, x) for branch in module.branches]
    joined = graph.op("Concat", *outputs, axis=1)
    return graph.op("Div", joined, graph.constant(math.sqrt(len(outputs))))


# ------------------------------------------------------------------------------ the model


def _input_shapes(
    model: nn.Module, example: Tensor
) -> tuple[dict[nn.Module, tuple[int, ...] | None], Tensor]:
    """The input shape (batch excluded) each module sees on ``example``, and the output.

    A module called on inputs of different shapes maps to ``None``.
    """
    shapes: dict[nn.Module, tuple[int, ...] | None] = {}

    def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        shape = tuple(args[0].shape[1:])
        shapes[module] = shape if shapes.get(module, shape) == shape else None

    handles = [module.register_forward_pre_hook(record) for module in model.modules()]
    try:
        with torch.no_grad():
            output = model(example)
    finally:
        for handle in handles:
            handle.remove()
    return shapes, output


def _radius(graph: _Graph, logits: str, mode: str, lipschitz: float) -> str:
    """The certified radius of each row of ``logits``, shape ``(N,)``: ``|f| / L`` (binary) or
    ``(top1 - top2) / (c L)``, with ``c L`` one constant of the graph."""
    flat = graph.op("Flatten", logits, axis=1)
    if mode == "binary":
        margin = graph.op("Abs", flat)
        scale = lipschitz
    else:
        top, _ = graph.node("TopK", [flat, graph.constant([2], integer=True)], outputs=2, axis=1)
        first, second = graph.node("Split", [top], outputs=2, axis=1, num_outputs=2)
        margin = graph.op("Sub", first, second)
        scale = MARGIN_DIVISORS[mode] * lipschitz
    radius = graph.op("Div", margin, graph.constant(scale))
    return graph.op("Reshape", radius, graph.constant([-1], integer=True))


def to_onnx(
    model: nn.Module,
    example: Tensor,
    *,
    opset_version: int = MIN_OPSET,
    lipschitz: float | None = None,
) -> onnx.ModelProto:
    """The ONNX model of ``model`` (a :func:`~liptune.export.vanilla_export` in eval mode).

    ``example`` is one input batch ``(N, *input_shape)``: the graph has the input ``"input"``
    of shape ``("batch", *input_shape)`` and the output ``"output"``, in ``example``'s dtype;
    the model's ``certificate_mode``, when it has one, is the metadata property
    ``"liptune.certificate_mode"``. With ``lipschitz`` (the guaranteed bound L the certificates
    divide by; the model must have a ``certificate_mode``) the graph has a second output
    ``"radius"`` of shape ``("batch",)``: margin / (c L) as :func:`liptune.certify.certificates`
    computes it, and L is the metadata property ``"liptune.lipschitz_bound"``. The result passes
    :func:`onnx.checker.check_model`.

    Raises:
        UnsupportedModule: a module of ``model`` has no emitter, or a setting the writer does
            not handle.
        ValueError: ``opset_version`` is below :data:`MIN_OPSET`, or ``lipschitz`` is given
            for a model without a certificate mode.
    """
    if opset_version < MIN_OPSET:
        raise ValueError(f"the ONNX writer needs opset_version >= {MIN_OPSET}, got {opset_version}")
    mode = getattr(model, "certificate_mode", None)
    if lipschitz is not None and mode is None:
        raise ValueError("a radius output needs a model with a certificate_mode")
    shapes, output = _input_shapes(model, example)
    graph = _Graph(example.dtype, shapes)
    out = graph.emit(model, "input")
    graph.nodes.append(helper.make_node("Identity", [out], ["output"]))
    element_type = helper.np_dtype_to_tensor_dtype(graph.dtype)
    outputs = [helper.make_tensor_value_info("output", element_type, ["batch", *output.shape[1:]])]
    if lipschitz is not None:
        radius = _radius(graph, out, str(mode), lipschitz)
        graph.nodes.append(helper.make_node("Identity", [radius], ["radius"]))
        outputs.append(helper.make_tensor_value_info("radius", element_type, ["batch"]))
    proto = helper.make_model(
        helper.make_graph(
            graph.nodes,
            "liptune",
            [helper.make_tensor_value_info("input", element_type, ["batch", *example.shape[1:]])],
            outputs,
            graph.initializers,
        ),
        opset_imports=[helper.make_opsetid("", opset_version)],
        producer_name="liptune",
    )
    properties = {}
    if mode is not None:
        properties["liptune.certificate_mode"] = mode
    if lipschitz is not None:
        properties["liptune.lipschitz_bound"] = repr(float(lipschitz))
    if properties:
        helper.set_model_props(proto, properties)
    proto.ir_version = helper.find_min_ir_version_for(list(proto.opset_import))
    onnx.checker.check_model(proto, full_check=True)
    return proto
