"""What a trial will cost before it runs: parameters and memory, from its spec alone.

The model is built by the zoo itself (:func:`worker.trial._models.build_model`) on PyTorch's
``meta`` device, where tensors have shapes but no storage, and one training forward pass is traced
at the batch size under :class:`torch.autograd.graph.saved_tensors_hooks`, which see every tensor
autograd keeps for the backward pass. So every layer family the zoo builds is costed the
way it really runs, and an architecture the input does not allow fails here with the zoo's own
message (e.g. more pooling stages than the image has pixels for).

The figures (bytes, float32):

- ``parameters``: the free parameters (what the optimizer updates);
- ``parameter_bytes``: weights, gradients and the optimizer's moments (Adam: 2 per parameter,
  SGD with momentum: 1, plain SGD: 0), plus the modules' buffers;
- ``constraint_bytes``: the tensors made while computing the constrained weights from the free
  ones (Björck iterations, normalisations, the constrained copy itself): autograd keeps them
  for the backward pass, so they count once per training step whatever the batch size;
- ``activation_bytes``: every other tensor autograd saves in the forward pass at the batch
  size, the logits with their gradient, and the augmented batch's copies;
- ``eval_bytes``: twice the largest module output of one evaluation batch
  (:data:`worker.trial._evaluation.EVAL_BATCH_SIZE`, no graph kept): the validation pass's peak;
- ``data_bytes``: the train and validation splits (float32 inputs, int64 labels), resident on
  the training device for the whole trial;
- ``cache_bytes``: a user's data set as a worker keeps it decoded in host memory for the
  study's trials (``uint8`` images of a folder, an ``.npz``'s or a plugin's arrays as stored);
  0 for the sets liptune ships.

This module is the one memory model of liptune: :func:`estimate` is what the API checks
against its limits, and :mod:`worker.trial._devices` adds the allocator's headroom to
:attr:`Cost.total_bytes` to decide how many trials fit on one device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import TypeAdapter

from worker.spec import (
    AugmentSpec,
    ConvNetSpec,
    DatasetSpec,
    MLPSpec,
    ModelSpec,
    StudySpec,
    TrialSpec,
)
from worker.trial._evaluation import EVAL_BATCH_SIZE
from worker.trial._models import build_model
from worker.trial.datasets._describe import DatasetDescription, describe_dataset
from worker.trial.datasets._loading import DEFAULT_SYNTHETIC_SAMPLES, TEST_FRACTION

_FLOAT_BYTES = 4
_LABEL_BYTES = 8
_MODEL_SPEC: TypeAdapter[ModelSpec] = TypeAdapter(ModelSpec)


@dataclass(frozen=True)
class Cost:
    """A trial's estimated size (see the module docstring for each figure)."""

    parameters: int
    parameter_bytes: int
    constraint_bytes: int
    activation_bytes: int
    eval_bytes: int
    data_bytes: int
    batch_size: int
    cache_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """Peak memory of a trial on its device: the training step, the validation pass and
        the resident data counted together (an upper bound of either pass's peak)."""
        parts = (self.parameter_bytes, self.constraint_bytes, self.activation_bytes)
        return sum(parts) + self.eval_bytes + self.data_bytes


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


def _training_examples(dataset: DatasetSpec, description: DatasetDescription) -> int:
    """An upper bound of the train + validation splits' size together (a class subset keeps
    its share of the set; a synthetic set leaves its test fraction out)."""
    if description.kind == "synthetic":
        return round((dataset.n_samples or DEFAULT_SYNTHETIC_SAMPLES) * (1 - TEST_FRACTION))
    pool = description.train_examples or dataset.n_samples or 0
    return min(pool, dataset.n_samples) if dataset.n_samples else pool


def estimate_model(
    model: ModelSpec,
    input_shape: tuple[int, ...],
    classes: int,
    batch_size: int,
    *,
    moments: int = 2,
    eval_batch_size: int = 0,
) -> Cost:
    """The cost of training ``model`` on inputs of ``input_shape`` (one example) at
    ``batch_size`` with an optimizer keeping ``moments`` tensors per parameter, and of
    evaluating it at ``eval_batch_size`` (0: no evaluation pass); ``data_bytes`` is 0. Raises
    ``ValueError`` (naming the spec field) for an architecture the input does not allow.
    Results are memoised (a trace takes a second)."""
    return _estimate_model(
        model.model_dump_json(), tuple(input_shape), classes, batch_size, moments, eval_batch_size
    )


@functools.lru_cache(maxsize=256)
def _estimate_model(
    model_json: str,
    input_shape: tuple[int, ...],
    classes: int,
    batch_size: int,
    moments: int,
    eval_batch_size: int,
) -> Cost:
    model = _MODEL_SPEC.validate_json(model_json)
    with torch.device("meta"):
        network = build_model(model, input_shape, classes)
    network.train()
    parameters = sum(p.numel() for p in network.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in network.buffers())
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
        parameter_bytes=(2 + moments) * weight_bytes + buffer_bytes,
        constraint_bytes=constraint.bytes,
        activation_bytes=max(0, total.bytes - constraint.bytes),
        eval_bytes=_eval_bytes(network, (eval_batch_size, *input_shape)) if eval_batch_size else 0,
        data_bytes=0,
        batch_size=batch_size,
    )


def _eval_bytes(network: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """Twice the largest module output of one evaluation batch of ``shape`` (its input and
    its output are alive together; no graph is kept)."""
    largest = 0

    def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    handles = [module.register_forward_hook(hook) for module in network.modules()]
    network.eval()
    try:
        with torch.no_grad():
            network(torch.zeros(shape, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return 2 * largest


def warm_up() -> None:
    """Trace two tiny models once: the first trace in a process loads torch's meta-device
    decompositions (seconds), which a server would rather not make its first request wait for."""
    estimate_model(MLPSpec(widths=[2]), (2,), 2, 1)
    estimate_model(ConvNetSpec(channels=[2], dense_widths=[2]), (1, 4, 4), 2, 1)


def estimate(spec: TrialSpec, data_roots: Sequence[Path] | None = None) -> Cost:
    """The cost of one trial of ``spec``, on its data set's input shape, at its batch size
    and the evaluation batch size (both capped by the training set's size), with its
    optimizer's moments and the train and validation splits resident."""
    description = describe_dataset(spec.dataset, data_roots)
    examples = _training_examples(spec.dataset, description)
    cap = examples or max(spec.training.batch_size, EVAL_BATCH_SIZE)
    training = spec.training
    moments = 2 if training.optimizer == "adam" else int(training.momentum > 0)
    cost = estimate_model(
        spec.model,
        description.input_shape,
        description.num_classes,
        min(training.batch_size, cap),
        moments=moments,
        eval_batch_size=min(EVAL_BATCH_SIZE, cap),
    )
    data = examples * (math.prod(description.input_shape) * _FLOAT_BYTES + _LABEL_BYTES)
    augment = augmentation_bytes(training.augment, description.input_shape, cost.batch_size)
    return Cost(
        **{
            **cost.__dict__,
            "activation_bytes": cost.activation_bytes + augment,
            "data_bytes": data,
            "cache_bytes": description.cache_bytes,
        }
    )


def augmentation_bytes(
    augment: AugmentSpec | None, input_shape: Sequence[int], batch_size: int
) -> int:
    """The augmented batch's copies (:mod:`worker.trial._augment`): the zero-padded batch, the band
    of rows gathered from it and the cropped batch for ``random_crop``, the flipped batch and its
    selection for ``horizontal_flip``; all float32 at the batch size."""
    if augment is None or len(input_shape) != 3:
        return 0
    channels, height, width = input_shape
    image = channels * height * width
    total = 0
    if augment.random_crop:
        padding = augment.random_crop
        padded = channels * (height + 2 * padding) * (width + 2 * padding)
        band = channels * height * (width + 2 * padding)
        total += padded + band + image
    if augment.horizontal_flip:
        total += 2 * image
    return batch_size * total * _FLOAT_BYTES


def study_cost(spec: StudySpec, data_roots: Sequence[Path] | None = None) -> Cost:
    """The largest :func:`estimate` among the trials ``spec`` can ask for: the loss parameters
    do not change the cost, the searched convolution families may."""
    costs = [
        estimate(
            spec.trial_spec({"loss": spec.search_space.families[0]} | conv, seed=spec.seed),
            data_roots,
        )
        for conv in ([{"conv": family} for family in spec.search_space.conv or []] or [{}])
    ]
    return max(costs, key=lambda cost: (cost.total_bytes, cost.parameters))
