"""Device memory: what a trial needs, what a device offers, and how a device is shared.

:func:`trial_memory_bytes` is a trial's peak device memory from its spec alone (no data read,
no weight allocated). The bytes come from :func:`worker.trial._costs.estimate`, the one memory model
(the API's admission limits use the same figures), grouped as

- ``data``: the train and validation splits, resident on the device for the whole trial;
- ``state``: parameters, buffers, gradients and the optimiser's moments;
- ``activations``: the tensors autograd saves for the backward pass of one training batch
  (the constrained weights and Björck's intermediate products included), plus the peak of one
  evaluation batch;

and the estimate is their sum times :data:`ESTIMATE_MARGIN` (the caching allocator's
fragmentation, cuBLAS workspaces). :func:`study_memory_bytes` takes the largest over the
convolution families a study searches.

:func:`trial_budget_bytes` shares a device between ``n`` concurrent trials, one process each:
what the device has (:func:`device_memory_bytes`) times :data:`DEVICE_MEMORY_FRACTION`, less a
CUDA context per process, split evenly. A worker slot never claims a trial whose estimate
exceeds its share, so ``n`` slots never oversubscribe the device.

Several trials per device are several processes (``liptune worker --trials-per-device N`` runs them
under :mod:`service.supervisor`), not CUDA streams in one: a small 1-Lipschitz net is bound by
Python's per-step launch overhead, which threads would serialise on the GIL; torch's seeds, thread
counts and TF32 switches are per process; and a trial that crashes or runs out of memory takes only
its own process down. The price is one CUDA context per trial (:data:`CUDA_CONTEXT_BYTES`), which
the budget counts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from worker.spec import StudySpec, TrialSpec
from worker.trial._costs import estimate, study_cost

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


def trial_memory(spec: TrialSpec) -> MemoryEstimate:
    """The parts of :func:`trial_memory_bytes` (see the module docstring)."""
    cost = estimate(spec)
    return MemoryEstimate(
        data=cost.data_bytes,
        state=cost.parameter_bytes,
        activations=cost.constraint_bytes + cost.activation_bytes + cost.eval_bytes,
    )


def trial_memory_bytes(spec: TrialSpec) -> int:
    """The estimated peak device memory of the trial ``spec`` (bytes, margin included)."""
    return trial_memory(spec).total


def study_memory_bytes(spec: StudySpec) -> int:
    """The largest :func:`trial_memory_bytes` among the trials ``spec`` can ask for
    (:func:`worker.trial._costs.study_cost`: the searched convolution families may differ)."""
    return math.ceil(study_cost(spec).total_bytes * ESTIMATE_MARGIN)


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
