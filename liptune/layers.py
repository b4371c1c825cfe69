r"""One registry of the layer types the core certifies and exports.

Each entry (:class:`LayerType`) says how the guaranteed bound of :mod:`liptune.bounds` treats a
module type (its :class:`BoundRule`) and, where the ONNX writer of :mod:`liptune.onnx` knows it,
the emitter that writes it. The bound walks an exported model
(:func:`liptune.export.vanilla_export`), so the weighted types are plain ``nn.Linear`` /
``nn.Conv2d``; the constrained layers of :mod:`liptune.nn` reach it through their export.

A module is of a registered type when the nearest registered class of its MRO is that type *and*
it computes what that type computes: a subclass that overrides ``forward`` (or a convolution's
``_conv_forward``) could compute anything, so it is not bounded by its weights, and
:func:`layer_type` answers ``None`` for it.

>>> layer_type(nn.ReLU()).bound
<BoundRule.ONE_LIPSCHITZ: 'one-lipschitz'>
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from torch import nn

import liptune.nn as lnn

__all__ = ["LAYER_TYPES", "BoundRule", "LayerType", "layer_type", "register_layer"]


class BoundRule(StrEnum):
    r"""How :mod:`liptune.bounds` bounds a module of a type.

    - ``ONE_LIPSCHITZ``: 1, no weights (the core's activations and pooling, ``nn.ReLU``,
      reshapes, ``nn.Identity``, ``nn.Dropout`` in eval mode);
    - ``WEIGHTED``: its operator norm, guaranteed (SVD for ``nn.Linear``; circulant or dense for
      ``nn.Conv2d`` and ``nn.AvgPool2d``);
    - ``SEQUENTIAL``: the product of its children's;
    - ``RESIDUAL``: :math:`t + (1 - t) L` of its ``block``;
    - ``CONCAT``: :math:`\sqrt{\sum_i L_i^2 / n}` of its ``branches``;
    - ``SLL``: the SLL condition checked on its weights (:func:`liptune.bounds.sll_bound`).
    """

    ONE_LIPSCHITZ = "one-lipschitz"
    WEIGHTED = "weighted"
    SEQUENTIAL = "sequential"
    RESIDUAL = "residual"
    CONCAT = "concat"
    SLL = "sll"


@dataclass
class LayerType:
    """A registered module type: its bound rule and its ONNX emitter (``None``: the ONNX writer
    refuses it). The emitter is set by :mod:`liptune.onnx` when it is imported."""

    module_type: type[nn.Module]
    bound: BoundRule
    emitter: Callable[..., str] | None = None


LAYER_TYPES: dict[type[nn.Module], LayerType] = {}


def register_layer(module_type: type[nn.Module], bound: BoundRule) -> LayerType:
    """Register ``module_type`` with its bound rule (once per type); returns its entry."""
    if module_type in LAYER_TYPES:
        raise ValueError(f"{module_type.__qualname__} is already a registered layer type")
    entry = LayerType(module_type, BoundRule(bound))
    LAYER_TYPES[module_type] = entry
    return entry


def layer_type(module: nn.Module) -> LayerType | None:
    """The registered type ``module`` is (the nearest registered class of its MRO), when it
    computes what that type computes; ``None`` otherwise."""
    entry = next((LAYER_TYPES[kind] for kind in type(module).__mro__ if kind in LAYER_TYPES), None)
    if entry is None or type(module).forward is not entry.module_type.forward:
        return None
    if isinstance(module, nn.Conv2d) and type(module)._conv_forward is not nn.Conv2d._conv_forward:
        return None
    return entry


def _register_builtins(rule: BoundRule, *types: type[nn.Module]) -> None:
    for module_type in types:
        register_layer(module_type, rule)


_register_builtins(
    BoundRule.ONE_LIPSCHITZ,
    lnn.FullSort,
    lnn.GroupSort,
    lnn.GroupSort2,
    lnn.HouseHolder,
    lnn.MaxMin,
    lnn.InvertibleDownSampling,
    lnn.ScaledAvgPool2d,
    lnn.ScaledGlobalAvgPool2d,
    lnn.ScaledGlobalL2NormPool2d,
    lnn.ScaledL2NormPool2d,
    nn.ReLU,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
)
_register_builtins(BoundRule.WEIGHTED, nn.Linear, nn.Conv2d, nn.AvgPool2d)
_register_builtins(BoundRule.SEQUENTIAL, nn.Sequential, lnn.LipschitzSequential)
_register_builtins(BoundRule.RESIDUAL, lnn.LipschitzResidual)
_register_builtins(BoundRule.CONCAT, lnn.ScaledConcat)
_register_builtins(BoundRule.SLL, lnn.SLLResidual)
