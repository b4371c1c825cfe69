"""Several trials per device: the memory estimate, the device's share per trial, workers that
refuse studies too large for their share, and ``liptune worker --trials-per-device N`` running N
trials of one study at once with the exact budget."""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

from service.migrations import upgrade
from worker.loop import Worker, WorkerOptions
from worker.spec import TrialSpec
from worker.study._record import TrialAttributes
from worker.study._studies import create_study, optuna_study_name
from worker.trial._costs import estimate
from worker.trial._devices import (
    CUDA_CONTEXT_BYTES,
    DEVICE_MEMORY_FRACTION,
    ESTIMATE_MARGIN,
    study_memory_bytes,
    trial_budget_bytes,
    trial_memory,
)
from worker.trial._models import build_model

GIB = 2**30


def digits_trial(**training: Any) -> TrialSpec:
    return TrialSpec.model_validate(
        {
            "name": "memory",
            "dataset": {"name": "digits"},
            "model": {"name": "mlp", "widths": [64, 64]},
            "training": {"batch_size": 64, **training},
            "loss": {"family": "hkr"},
        }
    )


def test_the_estimate_counts_the_data_and_the_optimiser_state_exactly():
    spec = digits_trial()
    estimate = trial_memory(spec)
    # 1,438 training + validation images of 8x8 float32 and their int64 labels.
    assert estimate.data == 1438 * (64 * 4 + 8)
    model = build_model(spec.model, (1, 8, 8), 10)
    parameters = sum(p.numel() for p in model.parameters()) * 4
    buffers = sum(b.numel() for b in model.buffers()) * 4
    assert estimate.state == 4 * parameters + buffers  # weights, gradients, Adam's 2 moments
    sgd = trial_memory(digits_trial(optimizer="sgd", momentum=0.0))
    assert sgd.state == 2 * parameters + buffers
    # At least the batch's inputs and each layer's outputs are kept for the backward pass.
    assert estimate.activations > 64 * (64 + 64 + 64 + 10) * 4
    assert estimate.total == pytest.approx(
        (estimate.data + estimate.state + estimate.activations) * ESTIMATE_MARGIN, abs=1
    )


def test_larger_batches_and_wider_nets_need_more():
    small = trial_memory(digits_trial()).activations
    assert trial_memory(digits_trial(batch_size=256)).activations > small
    wide = digits_trial().model_copy(
        update={"model": digits_trial().model.model_copy(update={"widths": [512, 512]})}
    )
    assert trial_memory(wide).state > trial_memory(digits_trial()).state


def test_a_device_is_shared_evenly_after_one_cuda_context_per_trial():
    cuda = torch.device("cuda")
    share = trial_budget_bytes(cuda, 4, total=16 * GIB)
    assert share == (int(16 * GIB * DEVICE_MEMORY_FRACTION) - 4 * CUDA_CONTEXT_BYTES) // 4
    assert trial_budget_bytes(torch.device("cpu"), 2, total=8 * GIB) == int(8 * GIB * 0.9) // 2
    with pytest.raises(ValueError, match="run fewer trials per device"):
        trial_budget_bytes(cuda, 32, total=16 * GIB)
    with pytest.raises(ValueError, match=">= 1"):
        trial_budget_bytes(cuda, 0, total=16 * GIB)


def new_study(url: str, spec: Any) -> optuna.Study:
    study_id = uuid.uuid4().hex
    upgrade(url)
    create_study(url, spec, study_id)
    return optuna.load_study(study_name=optuna_study_name(study_id), storage=url)


def test_a_worker_leaves_a_study_above_its_budget_and_one_at_the_budget_runs_it(
    sqlite_url: str, tiny_study_spec: Callable[..., Any]
):
    spec = tiny_study_spec(n_trials=2)
    study = new_study(sqlite_url, spec)
    needed = study_memory_bytes(spec)

    def worker(budget: int) -> Worker:
        options = WorkerOptions(
            storage_url=sqlite_url, device="cpu", exit_when_idle=True, memory_budget=budget
        )
        return Worker(options)

    assert worker(needed - 1).run() == 0
    assert study.trials == []
    assert worker(needed).run() == 2
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2


def test_trials_per_device_runs_that_many_trials_at_once_with_the_exact_budget(
    sqlite_url: str, tiny_study_spec: Callable[..., Any], worker_processes: Any
):
    spec = tiny_study_spec(
        n_trials=4, training={"epochs": 5, "batch_size": 64, "lr": 0.01, "device": "cpu"}
    )
    study = new_study(sqlite_url, spec)
    process = worker_processes.start(
        sqlite_url, "--once", "--mlflow", "none", "--trials-per-device", "2", name="dev"
    )
    assert process.wait(timeout=400) == 0, worker_processes.log("dev")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == len(study.trials) == 4
    workers = {TrialAttributes.read(trial).worker for trial in complete}
    assert workers == {"dev-0", "dev-1"}
    # The most trials running at one moment, from Optuna's start and completion times.
    events = sorted(
        [(t.datetime_start, 1) for t in complete] + [(t.datetime_complete, -1) for t in complete]
    )
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    assert peak == 2


def test_trials_per_device_refuses_a_device_too_small_before_starting(
    sqlite_url: str, worker_processes: Any
):
    process = worker_processes.start(
        sqlite_url, "--once", "--mlflow", "none", "--trials-per-device", "2", "--device", "cuda"
    )
    assert process.wait(timeout=120) == 2
    assert "CUDA is not available" in worker_processes.log("w0")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_the_device_estimate_is_the_admission_estimate_and_allocates_no_weight():
    # A 2 x 65,536-unit MLP on Fashion-MNIST: 4.3 G parameters, 17 GB of float32 weights if
    # they were ever allocated; the estimate builds on the meta device only.
    spec = digits_trial().model_copy(
        update={
            "dataset": digits_trial().dataset.model_copy(update={"name": "fashion-mnist"}),
            "model": digits_trial().model.model_copy(update={"widths": [65536, 65536]}),
        }
    )
    before = _rss_bytes()
    memory = trial_memory(spec)
    assert _rss_bytes() - before < 2**30
    cost = estimate(spec)
    assert memory.state == cost.parameter_bytes
    # Weights, gradients, Adam's two moments; the power iteration's vectors are the buffers.
    assert 0 < cost.parameter_bytes - 4 * 4 * cost.parameters < 2**21
    assert memory.data == cost.data_bytes == 60000 * (784 * 4 + 8)
    assert memory.total == math.ceil(cost.total_bytes * ESTIMATE_MARGIN)
