r"""Export a model built from :mod:`liptune.nn` to plain PyTorch and ONNX, and bound it.

- :func:`vanilla_export` replaces each constrained layer by a plain ``nn.Linear`` or
  ``nn.Conv2d`` holding its constrained weight (an SLL layer by
  :class:`~liptune.nn.SLLResidual`, plain ``nn.Conv2d`` and ``nn.ConvTranspose2d``): same
  outputs, no parametrisation, picklable.
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

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from liptune._plain import vanilla_export
from liptune.bounds import lipschitz_bound

__all__ = ["export_onnx", "lipschitz_upper_bound", "vanilla_export"]


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


#: The guaranteed bound :func:`liptune.bounds.lipschitz_bound`, under the name this module gives it.
lipschitz_upper_bound = lipschitz_bound
