"""Device memory: what a trial needs, what a device offers, and how a device is shared.

:func:`trial_memory_bytes` estimates a trial's peak device memory from its spec alone (no data
read, no weight allocated): the model is built on torch's ``meta`` device and one training step
and one evaluation batch are traced there, which gives

- ``data``: the train and validation splits, resident on the device for the whole trial;
- ``state``: parameters, buffers, gradients and the optimiser's moments (Adam: 2 per
  parameter, SGD with momentum: 1);
- ``activations``: the tensors autograd saves for the backward pass of one training batch
  (Björck's intermediate products included), plus the largest output of one evaluation batch;

and the estimate is their sum times :data:`ESTIMATE_MARGIN` (the caching allocator's
fragmentation, cuBLAS workspaces). :func:`study_memory_bytes` takes the largest over the
convolution families a study searches.

:func:`trial_budget_bytes` shares a device between ``n`` concurrent trials, one process each:
what the device has (:func:`device_memory_bytes`) times :data:`DEVICE_MEMORY_FRACTION`, less a
CUDA context per process, split evenly. A worker slot never claims a trial whose estimate
exceeds its share, so ``n`` slots never oversubscribe the device.

Several trials per device are several processes (:func:`run_processes`), not CUDA streams in
one: a small 1-Lipschitz net is bound by Python's per-step launch overhead, which threads
would serialise on the GIL; torch's seeds, thread counts and TF32 switches are per process; and
a trial that crashes or runs out of memory takes only its own process down. The price is one
CUDA context per trial (:data:`CUDA_CONTEXT_BYTES`), which the budget counts.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from worker.datasets import dataset_info
from worker.datasets.loading import DEFAULT_SYNTHETIC_SAMPLES, TEST_FRACTION
from worker.evaluation import EVAL_BATCH_SIZE
from worker.models import build_model
from worker.spec import DatasetSpec, StudySpec, TrialSpec

#: Headroom on top of the traced bytes.
ESTIMATE_MARGIN = 1.25
#: The share of a device's memory that trials may plan to use.
DEVICE_MEMORY_FRACTION = 0.9
#: Device memory a CUDA context (and torch's kernels) takes in each process.
CUDA_CONTEXT_BYTES = 512 * 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    """A trial's peak device memory, by part (bytes); ``total`` includes the margin."""

    data: int
    state: int
    activations: int

    @property
    def total(self) -> int:
        return math.ceil((self.data + self.state + self.activations) * ESTIMATE_MARGIN)


def _training_examples(spec: DatasetSpec) -> int:
    """How many examples the train and validation splits hold together (an upper bound)."""
    info = dataset_info(spec.name)
    if info.kind == "synthetic":
        pool = round((spec.n_samples or DEFAULT_SYNTHETIC_SAMPLES) * (1 - TEST_FRACTION))
    else:
        pool = info.train_examples
        if spec.classes:
            pool = math.ceil(pool * len(spec.classes) / info.num_classes)
        if spec.n_samples is not None:
            pool = min(pool, spec.n_samples)
    return pool


def _num_classes(spec: DatasetSpec) -> int:
    return len(spec.classes) if spec.classes else dataset_info(spec.name).num_classes


def trial_memory(spec: TrialSpec) -> MemoryEstimate:
    """The parts of :func:`trial_memory_bytes` (see the module docstring)."""
    info = dataset_info(spec.dataset.name)
    input_shape = info.input_shape
    examples = _training_examples(spec.dataset)
    data = examples * (math.prod(input_shape) * 4 + 8)
    model = build_model(spec.model, input_shape, _num_classes(spec.dataset)).to("meta")
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    moments = 2 if spec.training.optimizer == "adam" else int(spec.training.momentum > 0)
    state = parameters * (2 + moments) + buffers
    batch = min(spec.training.batch_size, examples)
    return MemoryEstimate(
        data=data,
        state=state,
        activations=_saved_bytes(model, (batch, *input_shape))
        + _largest_output_bytes(model, (min(EVAL_BATCH_SIZE, examples), *input_shape)),
    )


def trial_memory_bytes(spec: TrialSpec) -> int:
    """The estimated peak device memory of the trial ``spec`` (bytes, margin included)."""
    return trial_memory(spec).total


def study_memory_bytes(spec: StudySpec) -> int:
    """The largest :func:`trial_memory_bytes` among the trials ``spec`` can ask for (the loss
    parameters do not change memory; the searched convolution families may)."""
    families: Sequence[str | None] = spec.search_space.conv or [None]
    params = {"loss": "hkr", "margin": 1.0, "alpha_kr": 1.0}
    largest = 0
    for family in families:
        trial_params = params if family is None else {**params, "conv": family}
        trial = spec.trial_spec(trial_params, seed=spec.seed)
        largest = max(largest, trial_memory_bytes(trial))
    return largest


def _saved_bytes(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one training batch."""
    # A tensor saved twice counts once (the graph keeps them alive, so ids stay unique); views
    # count in full, which can only overestimate.
    saved: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[id(tensor)] = tensor
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = model(torch.empty(shape, device="meta"))
    kept = sum(tensor.numel() * tensor.element_size() for tensor in saved.values())
    return kept + 2 * outputs.numel() * outputs.element_size()


def _largest_output_bytes(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Twice the largest module output of one evaluation batch (its input and its output)."""
    largest = 0

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    handles = [module.register_forward_hook(hook) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(torch.empty(shape, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return 2 * largest


def device_memory_bytes(device: torch.device) -> int:
    """The memory of ``device``: a CUDA device's total, or the machine's physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def trial_budget_bytes(device: torch.device, trials: int, total: int | None = None) -> int:
    """Each of ``trials`` concurrent trials' share of ``device`` (bytes): ``total`` (default
    :func:`device_memory_bytes`) times :data:`DEVICE_MEMORY_FRACTION`, less one CUDA context
    per trial process on CUDA, split evenly. Raises ``ValueError`` when nothing is left."""
    if trials < 1:
        raise ValueError(f"trials per device must be >= 1, got {trials}")
    total = device_memory_bytes(device) if total is None else total
    context = CUDA_CONTEXT_BYTES if device.type == "cuda" else 0
    share = (int(total * DEVICE_MEMORY_FRACTION) - trials * context) // trials
    if share <= 0:
        raise ValueError(
            f"{trials} trials do not fit on {device} ({total / 2**30:.1f} GiB): each process "
            f"needs {context / 2**20:.0f} MiB of CUDA context; run fewer trials per device"
        )
    return share


def run_processes(commands: Sequence[Sequence[str]]) -> int:
    """Run ``commands`` as child processes until all have exited; SIGTERM and SIGINT are
    forwarded to every child (each stops its trial at the next epoch boundary). Returns the
    largest exit status."""
    children = [subprocess.Popen(list(command)) for command in commands]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {
        signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        return max(child.wait() for child in children)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
