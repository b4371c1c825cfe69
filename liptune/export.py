r"""Export a model built from :mod:`liptune.nn` to plain PyTorch and ONNX, and bound it.

- :func:`vanilla_export` replaces each constrained layer by a plain ``nn.Linear`` or
  ``nn.Conv2d`` holding its constrained weight (an SLL layer by
  :class:`~liptune.nn.SLLResidual`, plain ``nn.Conv2d`` and ``nn.ConvTranspose2d``): same
  outputs, no parametrisation, picklable.
- :func:`vanilla_export_at` does the same for a loss-conditioned network
  (:class:`~liptune.nn.ConditionedSequential`) at one fixed condition, each FiLM layer folded
  into the layer before it: a plain network of the usual kind.
- :func:`export_onnx` writes that plain model as ONNX with the direct writer of
  :mod:`liptune.onnx` (milliseconds), or with :func:`torch.onnx.export` for modules the
  writer does not know (seconds).
- :func:`lipschitz_upper_bound` is :func:`liptune.bounds.lipschitz_bound`: a guaranteed bound
  of the plain model's Lipschitz constant from its weights alone.

:func:`vanilla_export` is defined in :mod:`liptune._plain`, which :mod:`liptune.bounds` builds on
too: this module imports the bound, nothing imports this module back.

``input_shape`` is the shape of one example, without the batch dimension: ``(C, H, W)`` for
images, ``(features,)`` for vectors.
"""

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from liptune._plain import devolve, vanilla_export
from liptune.bounds import lipschitz_bound
from liptune.certify import CertificateMode
from liptune.nn.conditioning import ConditionedSequential, FiLM
from liptune.nn.containers import LipschitzSequential

__all__ = ["export_onnx", "lipschitz_upper_bound", "vanilla_export", "vanilla_export_at"]


def _fold(layer: nn.Module, gamma: Tensor, beta: Tensor) -> None:
    r"""Fold :math:`z \mapsto \gamma z + \beta` into the plain ``layer`` before it, in place:
    output channel ``c``'s weights times :math:`\gamma_c`, bias :math:`\gamma_c b_c + \beta_c`
    (a layer without bias gets one)."""
    if not isinstance(layer, nn.Linear | nn.Conv2d):
        raise TypeError(f"a FiLM layer folds into nn.Linear or nn.Conv2d, not {type(layer)}")
    weight = layer.weight
    gamma, beta = gamma.to(weight), beta.to(weight)
    weight.mul_(gamma.reshape(-1, *([1] * (weight.dim() - 1))))
    if layer.bias is None:
        layer.bias = nn.Parameter(beta.clone())
    else:
        layer.bias.mul_(gamma).add_(beta)


def vanilla_export_at(model: ConditionedSequential, condition: Tensor) -> LipschitzSequential:
    r"""A plain :class:`~liptune.nn.LipschitzSequential` computing ``model(x, condition)``.

    ``condition`` is one condition ``(k,)``. Each :class:`~liptune.nn.FiLM` layer's
    :math:`\gamma(t)` and :math:`\beta(t)` are folded into the ``nn.Linear``/``nn.Conv2d`` just
    before it (rows scaled by :math:`\gamma`, bias :math:`\gamma b + \beta`), and the FiLM layer
    is dropped; every other layer is exported as by :func:`vanilla_export`. The result has the
    model's ``certificate_mode``; :func:`liptune.bounds.lipschitz_bound`,
    :func:`~liptune.bounds.head_bound` and :func:`export_onnx` take it as any exported trial.
    """
    if not isinstance(model, ConditionedSequential):
        raise TypeError(
            f"vanilla_export_at expects a ConditionedSequential, got {type(model).__name__}"
        )
    condition = torch.as_tensor(condition)
    if condition.dim() != 1 or condition.numel() != model.condition_features:
        raise ValueError(
            f"one condition of shape ({model.condition_features},) is needed, got "
            f"{tuple(condition.shape)}"
        )
    modules: list[nn.Module] = []
    with torch.no_grad():
        for module in model:
            if isinstance(module, FiLM):
                parameter = next(module.parameters())
                gamma, beta = module.modulation(condition.to(parameter))
                _fold(modules[-1], gamma, beta)
                continue
            modules.append(devolve(copy.deepcopy(module).eval()))
    exported = LipschitzSequential(*modules, certificate_mode=model.certificate_mode)
    return exported.eval()


def _example(model: nn.Module, input_shape: Sequence[int], batch: int = 1) -> Tensor:
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(
            f"input_shape must be the shape of one example (no batch dimension) as positive "
            f"ints, e.g. (1, 28, 28); got {input_shape!r}"
        )
    parameter = next(model.parameters(), None)
    if parameter is None:
        return torch.rand((batch, *shape))
    return torch.rand((batch, *shape), dtype=parameter.dtype, device=parameter.device)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: Sequence[int],
    *,
    opset_version: int = 18,
    lipschitz: float | None = None,
) -> Path:
    """Write :func:`vanilla_export` of ``model`` to ``path`` as ONNX; return the path.

    The graph has one input ``"input"`` of shape ``(batch, *input_shape)`` with a dynamic
    batch dimension, and the output ``"output"``; with ``lipschitz`` (the guaranteed bound L
    of what the head promises) a second output ``"radius"``, ``(batch,)``: each input's
    certified radius margin / (c L), computed in the graph. Models made of the core's modules
    and plain ``nn.Linear``/``nn.Conv2d``/``nn.Flatten``/``nn.Sequential`` are written directly
    by :func:`liptune.onnx.to_onnx`; a model with any other module (or ``opset_version``
    below 18) goes through ``torch.onnx.export(dynamo=True)``, a few seconds per call.
    """
    # Imported here: importing liptune needs torch only, exporting to ONNX needs onnx.
    import onnx

    from liptune.onnx import MIN_OPSET, UnsupportedModule, to_onnx

    exported = vanilla_export(model)
    path = Path(path)
    if lipschitz is not None and not hasattr(exported, "certificate_mode"):
        raise ValueError("a radius output needs a model with a certificate_mode")
    if opset_version >= MIN_OPSET:
        try:
            proto = to_onnx(
                exported,
                _example(exported, input_shape),
                opset_version=opset_version,
                lipschitz=lipschitz,
            )
        except UnsupportedModule:
            pass
        else:
            onnx.save(proto, path)
            return path
    _torch_export_onnx(exported, path, input_shape, opset_version, lipschitz)
    return path


class _WithRadius(nn.Module):
    """``model``'s logits and each input's certified radius (for ``torch.onnx.export``)."""

    def __init__(self, model: nn.Module, lipschitz: float) -> None:
        super().__init__()
        self.model = model
        self.lipschitz = lipschitz

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        from liptune.certify import certificates

        logits = self.model(x)
        mode = cast(CertificateMode, self.model.certificate_mode)
        return logits, certificates(logits, mode, self.lipschitz)


def _torch_export_onnx(
    exported: nn.Module,
    path: Path,
    input_shape: Sequence[int],
    opset_version: int,
    lipschitz: float | None = None,
) -> None:
    # Batch 2: torch.export specialises a dimension of size 1 to a constant.
    example = _example(exported, input_shape, batch=2)
    batch = torch.export.Dim("batch", min=1)
    module = exported if lipschitz is None else _WithRadius(exported, lipschitz).eval()
    names = ["output"] if lipschitz is None else ["output", "radius"]
    with torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["input"],
            output_names=names,
            opset_version=opset_version,
            dynamo=True,
            dynamic_shapes=({0: batch},) if lipschitz is not None else {"input": {0: batch}},
            external_data=False,
            verbose=False,
        )


#: The guaranteed bound :func:`liptune.bounds.lipschitz_bound`, under the name this module gives it.
lipschitz_upper_bound = lipschitz_bound
