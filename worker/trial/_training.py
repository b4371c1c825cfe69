"""The training loop of one trial: optimiser, schedule, epochs, the divergence guard.

The train and validation splits are copied to the trial's device once (they are small: all of
Fashion-MNIST is 47 MB) and batches are drawn there, shuffled by a generator of that device
seeded from the trial's seed: the same spec, seed and device give the same model (a CUDA
generator draws other permutations than the CPU one). No DataLoader workers.

The loop never waits for the device inside an epoch: the step losses stay on the device and
are checked for NaN/inf every :data:`DIVERGENCE_CHECK_STEPS` steps and at the end of the epoch.
After each epoch the model is scored on the validation split (accuracy, certified accuracy at
the trial's eps, mean certified radius), on the device, with one read for the whole record.

Precision (``TrainingSpec.precision``): ``"float32"`` (default) trains in IEEE float32;
``"tf32"`` lets CUDA matmuls and convolutions of the training steps use TF32; ``"bf16"`` runs
the forward passes of the training steps under bfloat16 autocast (the loss and the optimiser
state stay float32). The validation pass always runs in IEEE float32, and so do export,
bounding and certification (:func:`full_precision`, used by :mod:`worker.trial._run`). The TF32
switches are process-wide torch settings: liptune runs one trial per process on a GPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from liptune.certify import CertificateMode, predict_with_certificates
from worker.spec import Precision, TrainingSpec, metric_key
from worker.trial._augment import Augment, build_augmentation
from worker.trial._evaluation import EVAL_BATCH_SIZE
from worker.trial.datasets import DataSplits, Split

#: Steps between two divergence checks (each one waits for the device once).
DIVERGENCE_CHECK_STEPS = 50


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
    """SGD or Adam; on CUDA the fused implementation (one kernel per step, its step counts
    on the device)."""
    fused = True if next(model.parameters()).device.type == "cuda" else None
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=spec.lr,
            momentum=spec.momentum,
            weight_decay=spec.weight_decay,
            fused=fused,
        )
    return torch.optim.Adam(
        model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, fused=fused
    )


@contextmanager
def _fp32_precision(value: str) -> Iterator[None]:
    """Set CUDA's float32 matmul and cuDNN convolution precision (``"ieee"`` or ``"tf32"``)
    for the block, then restore them."""
    # torch.backends.cudnn is replaced by a CudnnModule at import, whose `conv` precision the
    # module's own annotations (what mypy reads) do not declare.
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv  # type: ignore[attr-defined]
    previous = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = value
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = previous


def full_precision() -> contextlib.AbstractContextManager[None]:
    """IEEE float32 matmuls and convolutions (cuDNN defaults to TF32 convolutions): what
    validation, export, bounds and certificates run under."""
    return _fp32_precision("ieee")


def _autocast(
    precision: Precision, device: torch.device
) -> contextlib.AbstractContextManager[object]:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


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
    generator: torch.Generator | None,
    epoch: int,
    *,
    precision: Precision = "float32",
    check_every: int = DIVERGENCE_CHECK_STEPS,
    on_progress: Callable[[int, int, int], None] | None = None,
    augment: Augment | None = None,
) -> float:
    """One pass over ``train`` (already on the model's device) in batches shuffled on that
    device by ``generator`` (one of that device; ``None``: torch's default); the mean training
    loss.

    Nothing is read back to the host inside the loop: each step's loss is written to a
    device buffer, checked for NaN/inf every ``check_every`` steps and at the end of the epoch
    (one synchronisation each, the end one also reading the mean). Raises :class:`Diverged`
    naming the first non-finite step and the checked range it was found in; the steps between
    that one and the check have trained a model that is discarded with the trial.
    ``on_progress(epoch, step, n_steps)`` is called at each of those checks (no extra
    synchronisation): what ``liptune train`` shows inside a long epoch. ``augment(x,
    generator)`` (:func:`worker.trial._augment.build_augmentation`) transforms each batch on the
    device before the forward pass, with draws from ``generator``, reading nothing back either.
    """
    model.train()
    device = train.x.device
    order = torch.randperm(len(train), generator=generator, device=device)
    batches = order.split(batch_size)
    losses = torch.empty(len(batches), dtype=torch.float32, device=device)
    checked = 0
    for step, batch in enumerate(batches, start=1):
        inputs = train.x[batch]
        if augment is not None:
            inputs = augment(inputs, generator)
        with _autocast(precision, device):
            outputs = model(inputs)
        loss = loss_fn(outputs.float(), train.y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[step - 1] = loss.detach()
        if step - checked == check_every:
            _check_finite(losses, checked, step, epoch)
            checked = step
            if on_progress is not None:
                on_progress(epoch, step, len(batches))
    sizes = torch.full((len(batches),), batch_size, dtype=torch.float32, device=device)
    sizes[-1] = len(batches[-1])
    mean = (losses * sizes).sum() / len(train)
    window = losses[checked:]
    all_finite, value = torch.stack([torch.isfinite(window).all().float(), mean]).tolist()
    if not all_finite:
        _raise_diverged(window, checked, len(batches), epoch)
    return value


def _check_finite(losses: Tensor, start: int, end: int, epoch: int) -> None:
    """Raise :class:`Diverged` if a loss of steps ``start + 1 .. end`` is not finite."""
    window = losses[start:end]
    if not bool(torch.isfinite(window).all()):
        _raise_diverged(window, start, end, epoch)


def _raise_diverged(window: Tensor, start: int, end: int, epoch: int) -> None:
    first = int(torch.nonzero(~torch.isfinite(window))[0, 0])
    value = float(window[first])
    raise Diverged(
        f"the training loss became {value} at epoch {epoch}, step {start + first + 1} "
        f"(found by the divergence check of steps {start + 1}-{end})"
    )


def train(
    model: nn.Module,
    loss_fn: nn.Module,
    splits: DataSplits,
    spec: TrainingSpec,
    *,
    eps: Sequence[float],
    mode: CertificateMode,
    device: torch.device,
    seed: int,
    should_stop: Callable[[], bool] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    should_prune: Callable[[dict[str, float]], bool] | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> TrainingRun:
    """Train ``model`` (already on ``device``) for ``spec.epochs`` epochs.

    Each epoch record holds ``epoch`` (from 1), ``train_loss``, ``val_accuracy`` and
    ``val_certified_accuracy_eps_{e}`` for each eps and ``val_mean_certified_radius`` (when
    there is a validation split), ``lr`` and ``seconds``. ``should_stop`` is asked before every
    epoch; when it answers True the run stops with ``cancelled`` set. ``should_prune`` is asked
    with each epoch's record after ``on_epoch`` (not after the last epoch); True ends the run
    with ``pruned_at_epoch``. A NaN or infinite loss stops it with ``failure_reason`` set.
    ``on_progress`` is passed to :func:`train_epoch`. ``spec.augment`` transforms the training
    batches only (``ValueError`` naming ``training.augment``, before any epoch, when the data
    are not images); the validation records see the unaugmented split.
    """
    augment = build_augmentation(spec.augment, splits.input_shape)
    optimizer = make_optimizer(model, spec)
    schedule = make_schedule(optimizer, spec)
    generator = torch.Generator(device=device).manual_seed(seed)
    train_split, val_split = splits.train.to(device), splits.val.to(device)
    step_precision = "tf32" if spec.precision == "tf32" else "ieee"
    run = TrainingRun()
    for epoch in range(1, spec.epochs + 1):
        if should_stop is not None and should_stop():
            run.cancelled = True
            break
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        try:
            with _fp32_precision(step_precision):
                loss = train_epoch(
                    model,
                    loss_fn,
                    optimizer,
                    train_split,
                    spec.batch_size,
                    generator,
                    epoch,
                    precision=spec.precision,
                    on_progress=on_progress,
                    augment=augment,
                )
        except Diverged as error:
            run.failure_reason = str(error)
            break
        if schedule is not None:
            schedule.step()
        record = {"epoch": epoch, "train_loss": loss}
        if len(val_split):
            with full_precision():
                record.update(validation_metrics(model, val_split, eps, mode))
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


def validation_metrics(
    model: nn.Module, val: Split, eps: Sequence[float], mode: CertificateMode
) -> dict[str, float]:
    """``val_accuracy``, ``val_certified_accuracy_eps_{e}`` for each e and
    ``val_mean_certified_radius`` (0 when no point is correct) of ``model`` on ``val`` (both on
    one device), computed there and read back once."""
    _, predicted, radii = predict_with_certificates(
        model, val.x, batch_size=EVAL_BATCH_SIZE, mode=mode
    )
    correct = predicted == val.y
    radii = radii.double()
    eps_tensor = torch.as_tensor(list(eps), dtype=radii.dtype, device=radii.device)
    certified = correct[:, None] & (radii[:, None] > eps_tensor[None, :])
    correct_count = correct.sum()
    mean_radius = (radii * correct).sum() / correct_count.clamp(min=1)
    values = torch.cat(
        [correct.double().mean()[None], certified.double().mean(0), mean_radius[None]]
    ).tolist()
    record = {"val_accuracy": values[0]}
    for value, fraction in zip(eps, values[1:-1], strict=True):
        record["val_" + metric_key("certified_accuracy", value)] = fraction
    record["val_mean_certified_radius"] = values[-1]
    return record
