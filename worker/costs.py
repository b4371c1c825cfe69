"""What a trial will cost before it runs: parameters and memory, from its spec alone.

The model is built by the zoo itself (:func:`worker.models.build_model`) on PyTorch's ``meta``
device, where tensors have shapes but no storage, and one training forward pass is traced at
the batch size under :class:`torch.autograd.graph.saved_tensors_hooks`, which see every tensor
autograd keeps for the backward pass. So every layer family the zoo builds is costed the
way it really runs, and an architecture the input does not allow fails here with the zoo's own
message (e.g. more pooling stages than the image has pixels for).

The figures (bytes, float32):

- ``parameters``: the free parameters (what the optimizer updates);
- ``parameter_bytes``: weights + gradients + two Adam moments, ``4 * 4 * parameters``;
- ``constraint_bytes``: the tensors made while computing the constrained weights from the free
  ones (Björck iterations, normalisations, the constrained copy itself): autograd keeps them
  for the backward pass, so they count once per training step whatever the batch size;
- ``activation_bytes``: every other tensor autograd saves in the forward pass at the batch
  size, and the logits with their gradient;
- ``data_bytes``: the training inputs, when they are moved to the training device.

:func:`estimate` is what the API checks against its limits; :func:`trial_memory_bytes` is the
peak a trial needs on its device (for how many trials fit on one).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from pydantic import TypeAdapter

from worker.datasets.registry import dataset_info
from worker.models import build_model
from worker.spec import ConvNetSpec, DatasetSpec, MLPSpec, ModelSpec, StudySpec, TrialSpec

_FLOAT_BYTES = 4
#: Weight, gradient and Adam's two moments per free parameter.
_PARAMETER_COPIES = 4
#: Points of a synthetic set when the spec does not say (as :mod:`worker.datasets.loading`).
_SYNTHETIC_SAMPLES = 2000
_MODEL_SPEC: TypeAdapter[ModelSpec] = TypeAdapter(ModelSpec)


@dataclass(frozen=True)
class Cost:
    """A trial's estimated size (see the module docstring for each figure)."""

    parameters: int
    parameter_bytes: int
    constraint_bytes: int
    activation_bytes: int
    data_bytes: int
    batch_size: int

    @property
    def total_bytes(self) -> int:
        """Peak memory of one training step, with the training data resident."""
        parts = (self.parameter_bytes, self.constraint_bytes, self.activation_bytes)
        return sum(parts) + self.data_bytes


class _Saved:
    """Adds up the bytes of the tensors autograd saves for the backward pass (a storage that
    several saved views share counts once)."""

    def __init__(self) -> None:
        self._storages: dict[int, int] = {}
        self._keep: list[object] = []

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self._keep.append(storage)  # meta storages have no address: key by the live object
        self._storages[id(storage)] = storage.nbytes()
        return tensor

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())


def num_classes(dataset: DatasetSpec) -> int:
    """Classes the trained model tells apart: the spec's subset, else all of the data set's."""
    return len(dataset.classes) if dataset.classes else dataset_info(dataset.name).num_classes


def training_examples(dataset: DatasetSpec) -> int:
    """An upper bound of the training split's size (train + validation pool)."""
    info = dataset_info(dataset.name)
    if info.kind == "synthetic":
        return dataset.n_samples or _SYNTHETIC_SAMPLES
    pool = info.train_examples or dataset.n_samples or 0
    return min(pool, dataset.n_samples) if dataset.n_samples else pool


def estimate_model(
    model: ModelSpec, input_shape: tuple[int, ...], classes: int, batch_size: int
) -> Cost:
    """The cost of training ``model`` on inputs of ``input_shape`` (one example) at
    ``batch_size``; ``data_bytes`` is 0. Raises ``ValueError`` (naming the spec field) for an
    architecture the input does not allow. Results are memoised (a trace takes a second)."""
    return _estimate_model(model.model_dump_json(), tuple(input_shape), classes, batch_size)


@functools.lru_cache(maxsize=256)
def _estimate_model(
    model_json: str, input_shape: tuple[int, ...], classes: int, batch_size: int
) -> Cost:
    model = _MODEL_SPEC.validate_json(model_json)
    with torch.device("meta"):
        network = build_model(model, input_shape, classes)
    network.train()
    parameters = sum(p.numel() for p in network.parameters())
    constraint = _Saved()
    with constraint.hooks():
        for module in network.modules():
            for name in getattr(module, "parametrizations", {}):
                getattr(module, name)
    total = _Saved()
    with total.hooks():
        outputs = network(torch.zeros((batch_size, *input_shape), device="meta"))
    # The logits and their gradient.
    total._storages[-1] = 2 * outputs.numel() * outputs.element_size()
    return Cost(
        parameters=parameters,
        parameter_bytes=_PARAMETER_COPIES * _FLOAT_BYTES * parameters,
        constraint_bytes=constraint.bytes,
        activation_bytes=max(0, total.bytes - constraint.bytes),
        data_bytes=0,
        batch_size=batch_size,
    )


def warm_up() -> None:
    """Trace two tiny models once: the first trace in a process loads torch's meta-device
    decompositions (seconds), which a server would rather not make its first request wait for."""
    estimate_model(MLPSpec(widths=[2]), (2,), 2, 1)
    estimate_model(ConvNetSpec(channels=[2], dense_widths=[2]), (1, 4, 4), 2, 1)


def estimate(spec: TrialSpec) -> Cost:
    """The cost of one trial of ``spec``, on its data set's input shape, at its batch size
    (capped by the training set's size), with the training inputs resident."""
    info = dataset_info(spec.dataset.name)
    examples = training_examples(spec.dataset)
    batch = min(spec.training.batch_size, examples) if examples else spec.training.batch_size
    cost = estimate_model(spec.model, info.input_shape, num_classes(spec.dataset), batch)
    data = examples * math.prod(info.input_shape) * _FLOAT_BYTES
    return Cost(**{**cost.__dict__, "data_bytes": data})


def trial_memory_bytes(spec: TrialSpec) -> int:
    """Peak bytes one trial of ``spec`` needs on its training device (see :class:`Cost`)."""
    return estimate(spec).total_bytes


def study_cost(spec: StudySpec) -> Cost:
    """The largest :func:`estimate` among the trials ``spec`` can ask for: the loss parameters
    do not change the cost, the searched convolution families may."""
    costs = [
        estimate(spec.trial_spec({"loss": spec.search_space.families[0]} | conv, seed=spec.seed))
        for conv in ([{"conv": family} for family in spec.search_space.conv or []] or [{}])
    ]
    return max(costs, key=lambda cost: (cost.total_bytes, cost.parameters))
