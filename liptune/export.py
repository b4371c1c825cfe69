r"""Export a model built from :mod:`liptune.nn` to plain PyTorch and ONNX, and bound it.

- :func:`vanilla_export` replaces each constrained layer by a plain ``nn.Linear`` or
  ``nn.Conv2d`` holding its constrained weight: same outputs, no parametrisation, picklable.
- :func:`export_onnx` writes that plain model as ONNX with the direct writer of
  :mod:`liptune.onnx` (milliseconds), or with :func:`torch.onnx.export` for modules the
  writer does not know (seconds).
- :func:`lipschitz_upper_bound` bounds the Lipschitz constant of the plain model from its
  weights alone, without trusting the constraints that produced them.

``input_shape`` is the shape of one example, without the batch dimension: ``(C, H, W)`` for
images, ``(features,)`` for vectors.
"""

import copy
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from liptune.nn import (
    FullSort,
    GroupSort,
    GroupSort2,
    HouseHolder,
    InvertibleDownSampling,
    LipschitzResidual,
    MaxMin,
    ScaledAvgPool2d,
    ScaledConcat,
    ScaledGlobalAvgPool2d,
    ScaledGlobalL2NormPool2d,
    ScaledL2NormPool2d,
)

__all__ = ["export_onnx", "lipschitz_upper_bound", "vanilla_export"]

_ONE_LIPSCHITZ = (
    FullSort,
    GroupSort,
    GroupSort2,
    HouseHolder,
    MaxMin,
    InvertibleDownSampling,
    ScaledAvgPool2d,
    ScaledGlobalAvgPool2d,
    ScaledGlobalL2NormPool2d,
    ScaledL2NormPool2d,
    nn.ReLU,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
)


def _plain_layer(layer: nn.Module) -> nn.Module:
    """A plain ``nn.Linear``/``nn.Conv2d`` with ``layer``'s (eval-mode) constrained weight."""
    weight = layer.weight.detach()
    factory = {"device": weight.device, "dtype": weight.dtype}
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=has_bias, **factory)
    else:
        plain = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=has_bias,
            padding_mode=layer.padding_mode,
            **factory,
        )
    with torch.no_grad():
        plain.weight.copy_(weight)
        if has_bias:
            plain.bias.copy_(layer.bias.detach())
    return plain


def _devolve(module: nn.Module) -> nn.Module:
    """Return ``module`` with every parametrisation inside it baked into plain tensors."""
    if parametrize.is_parametrized(module):
        if isinstance(module, nn.Linear | nn.Conv2d) and list(module.parametrizations) == [
            "weight"
        ]:
            plain = _plain_layer(module)
            if hasattr(module, "certificate_mode"):
                plain.certificate_mode = module.certificate_mode
            return plain
        for name in list(module.parametrizations):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    for name, child in module.named_children():
        setattr(module, name, _devolve(child))
    return module


def vanilla_export(model: nn.Module) -> nn.Module:
    """A copy of ``model`` where each constrained layer is a plain ``nn.Linear``/``nn.Conv2d``.

    The weights are the constrained weights as ``model`` uses them in eval mode (no power
    iteration step is taken, ``model`` is left untouched); padding, stride and padding mode
    (including circular) are kept, as are the core's activations, pooling and merges and the
    attribute ``certificate_mode``. The result is in eval mode and can be pickled.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"vanilla_export expects an nn.Module, got {type(model).__name__}")
    exported = copy.deepcopy(model).eval()
    with torch.no_grad():
        exported = _devolve(exported)
    return exported.eval()


def _example(model: nn.Module, input_shape: Sequence[int], batch: int = 1) -> Tensor:
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(
            f"input_shape must be the shape of one example (no batch dimension) as positive "
            f"ints, e.g. (1, 28, 28); got {input_shape!r}"
        )
    parameter = next(model.parameters(), None)
    factory = {} if parameter is None else {"dtype": parameter.dtype, "device": parameter.device}
    return torch.rand((batch, *shape), **factory)


def export_onnx(
    model: nn.Module, path: str | Path, input_shape: Sequence[int], *, opset_version: int = 18
) -> Path:
    """Write :func:`vanilla_export` of ``model`` to ``path`` as ONNX; return the path.

    The graph has one input ``"input"`` of shape ``(batch, *input_shape)`` with a dynamic
    batch dimension, and one output ``"output"``. Models made of the core's modules and
    plain ``nn.Linear``/``nn.Conv2d``/``nn.Flatten``/``nn.Sequential`` are written directly
    by :func:`liptune.onnx.to_onnx`; a model with any other module (or ``opset_version``
    below 18) goes through ``torch.onnx.export(dynamo=True)``, a few seconds per call.
    """
    # Imported here: importing liptune needs torch only, exporting to ONNX needs onnx.
    import onnx

    from liptune.onnx import MIN_OPSET, UnsupportedModule, to_onnx

    exported = vanilla_export(model)
    path = Path(path)
    if opset_version >= MIN_OPSET:
        try:
            proto = to_onnx(exported, _example(exported, input_shape), opset_version=opset_version)
        except UnsupportedModule:
            pass
        else:
            onnx.save(proto, path)
            return path
    _torch_export_onnx(exported, path, input_shape, opset_version)
    return path


def _torch_export_onnx(
    exported: nn.Module, path: Path, input_shape: Sequence[int], opset_version: int
) -> None:
    # Batch 2: torch.export specialises a dimension of size 1 to a constant.
    example = _example(exported, input_shape, batch=2)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        torch.onnx.export(
            exported,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["output"],
            opset_version=opset_version,
            dynamo=True,
            dynamic_shapes={"input": {0: batch}},
            external_data=False,
            verbose=False,
        )


def _operator_norm(operator, example: Tensor, iterations: int, tolerance: float) -> float:
    """Largest singular value of a linear ``operator`` on inputs shaped like ``example``.

    Power iteration on :math:`A^\\top A`, the adjoint taken by autograd (exact for any padding).
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(example.shape, generator=generator, dtype=torch.float64)
    x = (x / x.norm()).to(example.device)
    sigma = 0.0
    for _ in range(iterations):
        x.requires_grad_(True)
        y = operator(x)
        (x_next,) = torch.autograd.grad(y, x, grad_outputs=y)
        new_sigma = y.detach().norm().item()
        x = (x_next / x_next.norm()).detach()
        if abs(new_sigma - sigma) <= tolerance * new_sigma:
            return new_sigma
        sigma = new_sigma
    return sigma


def _child(name: str, child: str) -> str:
    return f"{name}.{child}" if name else child


@torch.no_grad()
def _apply(module: nn.Module, x: Tensor) -> Tensor:
    return module(x)


def _bound(module: nn.Module, x: Tensor, name: str, iterations: int, tolerance: float):
    """(Lipschitz bound of ``module`` on inputs shaped like ``x``, ``module(x)``)."""
    if isinstance(module, nn.Sequential):
        total = 1.0
        for child_name, child in module.named_children():
            constant, x = _bound(child, x, _child(name, child_name), iterations, tolerance)
            total *= constant
        return total, x
    if isinstance(module, LipschitzResidual):
        inner, _ = _bound(module.block, x, _child(name, "block"), iterations, tolerance)
        t = module.skip_weight
        return t + (1 - t) * inner, _apply(module, x)
    if isinstance(module, ScaledConcat):
        squares = sum(
            _bound(branch, x, _child(name, f"branches.{i}"), iterations, tolerance)[0] ** 2
            for i, branch in enumerate(module.branches)
        )
        return math.sqrt(squares / len(module.branches)), _apply(module, x)
    if isinstance(module, nn.Linear):
        return torch.linalg.matrix_norm(module.weight.double(), 2).item(), _apply(module, x)
    if isinstance(module, nn.Conv2d):
        weight = module.weight.detach().double()

        def convolve(z: Tensor) -> Tensor:
            return module._conv_forward(z, weight, None)

        return _operator_norm(convolve, x, iterations, tolerance), _apply(module, x)
    if isinstance(module, nn.AvgPool2d):
        return _operator_norm(module, x, iterations, tolerance), _apply(module, x)
    if isinstance(module, _ONE_LIPSCHITZ):
        return 1.0, _apply(module, x)
    raise TypeError(
        f"lipschitz_upper_bound cannot bound layer {name or '<model>'!r} of type "
        f"{type(module).__module__}.{type(module).__name__}; supported: nn.Sequential "
        f"containers, nn.Linear, nn.Conv2d, nn.AvgPool2d, LipschitzResidual, ScaledConcat and "
        f"the 1-Lipschitz activations and pooling of liptune.nn"
    )


def lipschitz_upper_bound(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    iterations: int = 1000,
    tolerance: float = 1e-7,
) -> float:
    r"""An upper bound of the L2 Lipschitz constant of ``model`` on inputs of ``input_shape``.

    Computed from :func:`vanilla_export` of ``model``, layer by layer: the product over a
    sequence of the layers' constants, where a linear layer counts its spectral norm (SVD), a
    convolution the norm of the real operator (its stride and padding, circular included, on
    the actual feature-map size; power iteration in float64 until the estimate changes by less
    than ``tolerance`` relatively, at most ``iterations`` steps), the core's activations and
    pooling 1, ``LipschitzResidual`` :math:`t + (1-t) L`, ``ScaledConcat``
    :math:`\sqrt{\sum L_i^2 / n}`. A layer it cannot bound raises a ``TypeError`` naming it.
    """
    exported = vanilla_export(model).double()
    example = _example(exported, input_shape)
    constant, _ = _bound(exported, example, "", iterations, tolerance)
    return constant
