"""Plain PyTorch copies of models built from :mod:`liptune.nn` (public as
:func:`liptune.export.vanilla_export`; here so that :mod:`liptune.bounds`, which bounds the plain
copy, and :mod:`liptune.export`, which re-exports the bound, need not import each other)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from liptune.nn.sll import SLLConv2d


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
    if isinstance(module, SLLConv2d):
        return module.vanilla()
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
