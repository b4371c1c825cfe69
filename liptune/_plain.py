"""Plain PyTorch copies of models built from :mod:`liptune.nn` (public as
:func:`liptune.export.vanilla_export`; here so that :mod:`liptune.bounds`, which bounds the plain
copy, and :mod:`liptune.export`, which re-exports the bound, need not import each other)."""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from liptune.nn.sll import SLLConv2d


def _plain_layer(layer: nn.Linear | nn.Conv2d) -> nn.Linear | nn.Conv2d:
    """A plain ``nn.Linear``/``nn.Conv2d`` with ``layer``'s (eval-mode) constrained weight."""
    weight = layer.weight.detach()
    factory: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
    bias = layer.bias
    plain: nn.Linear | nn.Conv2d
    if isinstance(layer, nn.Linear):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, **factory)
    else:
        # torch annotates the stored settings more loosely than the constructor takes them.
        settings: dict[str, Any] = {
            "stride": layer.stride,
            "padding": layer.padding,
            "dilation": layer.dilation,
            "padding_mode": layer.padding_mode,
        }
        plain = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            cast(tuple[int, int], layer.kernel_size),
            groups=layer.groups,
            bias=bias is not None,
            **settings,
            **factory,
        )
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None and plain.bias is not None:
            plain.bias.copy_(bias.detach())
    return plain


def devolve(module: nn.Module) -> nn.Module:
    """Return ``module`` with every parametrisation inside it baked into plain tensors."""
    if isinstance(module, SLLConv2d):
        return module.vanilla()
    if parametrize.is_parametrized(module):
        parametrizations = cast(nn.ModuleDict, module.parametrizations)
        if isinstance(module, nn.Linear | nn.Conv2d) and list(parametrizations) == ["weight"]:
            plain = _plain_layer(module)
            if hasattr(module, "certificate_mode"):
                plain.certificate_mode = module.certificate_mode
            return plain
        for name in list(parametrizations):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    for name, child in module.named_children():
        setattr(module, name, devolve(child))
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
        exported = devolve(exported)
    return exported.eval()
