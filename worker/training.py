"""The training loop of one trial: optimiser, schedule, epochs, the divergence guard.

Batches are drawn from tensors already in memory (no DataLoader workers: the data sets are
small and cached), shuffled by a generator seeded from the trial's seed, so the same spec and
seed give the same model. After each epoch the model is scored on the validation split
(accuracy and certified accuracy at the trial's eps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from worker.datasets import DataSplits, Split
from worker.evaluation import accuracy_metrics, mean_certified_radius, predict
from worker.spec import TrainingSpec


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainingRun:
    """What the loop did: one record per finished epoch and their end times (Unix seconds);
    ``cancelled`` when ``should_stop`` ended it, ``failure_reason`` when the loss diverged,
    ``pruned_at_epoch`` when ``should_prune`` ended it after that epoch."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    end_times: list[float] = field(default_factory=list)
    cancelled: bool = False
    failure_reason: str | None = None
    pruned_at_epoch: int | None = None

    @property
    def seconds(self) -> float:
        return sum(record["seconds"] for record in self.epochs)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; ``"cuda"``/``"cuda:N"`` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use `auto`")
    return device


def make_optimizer(model: nn.Module, spec: TrainingSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    return torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)


def make_schedule(
    optimizer: torch.optim.Optimizer, spec: TrainingSpec
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Stepped once per epoch: cosine annealing to 0 over ``epochs``, or ``gamma`` decay every
    ``step_size`` epochs."""
    if spec.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.epochs)
    if spec.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=spec.step_size, gamma=spec.gamma
        )
    return None


def train_epoch(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Split,
    batch_size: int,
    generator: torch.Generator,
    epoch: int,
) -> float:
    """One pass over ``train`` (already on the model's device) in shuffled batches; the mean
    training loss. Raises :class:`Diverged` at the first non-finite loss."""
    model.train()
    order = torch.randperm(len(train), generator=generator).to(train.x.device)
    total, count = 0.0, 0
    for step, batch in enumerate(order.split(batch_size), start=1):
        x, y = train.x[batch], train.y[batch]
        loss = loss_fn(model(x), y)
        value = loss.item()
        if not math.isfinite(value):
            raise Diverged(f"the training loss became {value} at epoch {epoch}, step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += value * len(batch)
        count += len(batch)
    return total / count


def train(
    model: nn.Module,
    loss_fn: nn.Module,
    splits: DataSplits,
    spec: TrainingSpec,
    *,
    eps: Sequence[float],
    mode: str,
    device: torch.device,
    seed: int,
    should_stop: Callable[[], bool] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    should_prune: Callable[[dict[str, float]], bool] | None = None,
) -> TrainingRun:
    """Train ``model`` (already on ``device``) for ``spec.epochs`` epochs.

    Each epoch record holds ``epoch`` (from 1), ``train_loss``, ``val_accuracy`` and
    ``val_certified_accuracy_eps_{e}`` for each eps and ``val_mean_certified_radius`` (when
    there is a validation split), ``lr`` and ``seconds``. ``should_stop`` is asked before every
    epoch; when it answers True the run stops with ``cancelled`` set. ``should_prune`` is asked
    with each epoch's record after ``on_epoch`` (not after the last epoch); True ends the run
    with ``pruned_at_epoch``. A NaN or infinite loss stops it with ``failure_reason`` set.
    """
    optimizer = make_optimizer(model, spec)
    schedule = make_schedule(optimizer, spec)
    generator = torch.Generator().manual_seed(seed)
    train_split = Split(splits.train.x.to(device), splits.train.y.to(device))
    run = TrainingRun()
    for epoch in range(1, spec.epochs + 1):
        if should_stop is not None and should_stop():
            run.cancelled = True
            break
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        try:
            loss = train_epoch(
                model, loss_fn, optimizer, train_split, spec.batch_size, generator, epoch
            )
        except Diverged as error:
            run.failure_reason = str(error)
            break
        if schedule is not None:
            schedule.step()
        record = {"epoch": epoch, "train_loss": loss}
        if len(splits.val):
            val = predict(model, splits.val.x, splits.val.y, mode)
            record.update(accuracy_metrics(val, eps, prefix="val_"))
            record["val_mean_certified_radius"] = mean_certified_radius(val)
        record["lr"] = lr
        record["seconds"] = time.perf_counter() - started
        run.epochs.append(record)
        run.end_times.append(time.time())
        if on_epoch is not None:
            on_epoch(dict(record))
        if should_prune is not None and epoch < spec.epochs and should_prune(dict(record)):
            run.pruned_at_epoch = epoch
            break
    return run
