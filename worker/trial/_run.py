"""One trial end to end: data, model, training, evaluation, export, MLflow.

:func:`run_trial` is the unit of work that studies repeat. Its outcome is a
:class:`TrialResult`:

- ``"completed"``: metrics of the exported model on the test split, its radii, the MLflow run;
- ``"failed"``: the loss diverged (NaN/inf), or the guaranteed Lipschitz bound L of what the
  exported model's head promises (:func:`liptune.bounds.head_constants`: the whole map for
  binary/global heads, each logit for classwise ones) exceeds ``1 + LIPSCHITZ_TOLERANCE``.
  Otherwise the certificates are margin / (c · L): sound for any L, larger when L < 1.
  No metric is recorded; the MLflow run is marked FAILED with the reason in the tag
  ``liptune.failure_reason``;
- ``"cancelled"``: ``should_stop`` answered True between two epochs (MLflow run KILLED, with the
  epochs done);
- ``"pruned"``: ``should_prune`` stopped it after ``pruned_at_epoch`` epochs (MLflow run KILLED
  with the epochs done and the tag ``liptune.status=pruned``; nothing is exported or tested: the
  values it reached are its last epoch's validation metrics);
- ``"failed"`` too when an allocation failed (host or device memory): the reason starts
  ``out of memory:`` and names the model, the batch size and the allocation; nothing is logged
  to MLflow and what the trial had allocated is released, so its worker goes on.

A spec that cannot run at all (missing data set, an architecture that does not fit the input, a
loss without a variant for the task) raises before anything is trained or logged:
:class:`~worker.trial.datasets.DatasetError` or ``ValueError``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import cast

import torch
from torch import nn

from liptune.attacks import certificate_check, minimal_l2_attack
from liptune.bounds import head_constants
from liptune.certify import CertificateMode, certificate_mode
from liptune.export import export_onnx, vanilla_export, vanilla_export_at
from liptune.nn import ConditionedSequential
from liptune.serving import Certificate
from worker.common._paths import default_data_roots, liptune_home
from worker.spec import FAMILY_PARAMS, StudySpec, TrialSpec
from worker.tracking import _mlflow as tracking
from worker.trial._certificates import AttackSummary, RadiiSummary
from worker.trial._conditional import (
    NETWORK_RUN_TAG,
    ConditionSpace,
    build_network,
    training_view,
)
from worker.trial._evaluation import (
    Predictions,
    accuracy_metrics,
    pgd_metrics,
    predict,
    robustness_metrics,
)
from worker.trial._losses import build_loss
from worker.trial._models import build_model
from worker.trial._training import TrainingRun, full_precision, resolve_device, train
from worker.trial.datasets import DataSplits, load_dataset

#: Correctly classified test points each completed trial's certificates are attacked on.
ATTACK_POINTS = 100
_log = logging.getLogger(__name__)
#: A model whose guaranteed bound L (of what its head promises) exceeds 1 + this is failed.
#: Below it the certificates stay sound whatever L is (they divide by L); above it the layers'
#: constraints evidently did not hold (rounding and Björck's tolerance stay far below 1 %), so
#: the trial is not a result of the constrained architecture it claims to be.
LIPSCHITZ_TOLERANCE = 0.01
FAILURE_TAG = tracking.FAILURE_TAG
# Parameter initialisation draws from torch's global generator: seeding and building happen
# under one lock so that trials in parallel threads stay reproducible.
_init_lock = threading.Lock()
_threads_lock = threading.Lock()


class TrialOutcome(StrEnum):
    """How :func:`run_trial` ended (the MLflow tag ``liptune.status`` holds its value)."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PRUNED = "pruned"


@dataclass
class TrialResult:
    """The outcome of :func:`run_trial`.

    ``metrics`` (empty unless completed) maps :func:`worker.spec.metric_key` names to floats;
    ``epochs`` holds one record per finished epoch (``epoch``, ``train_loss``,
    ``val_accuracy``, ``val_certified_accuracy_eps_{e}``, ``lr``, ``seconds``); ``radii``
    summarises the test split's certificates; ``model`` is the exported (plain, picklable)
    model on the CPU; ``timings`` the seconds spent in each phase (``data``, ``training``,
    ``export``, ``lipschitz_bound``, ``evaluation``, ``attack``, ``pgd``, ``tracking`` which
    includes ``onnx``); ``attack`` checks the certificates of ``ATTACK_POINTS`` correctly
    classified test points with a minimal-norm attack (violations must be 0).
    """

    status: TrialOutcome
    metrics: dict[str, float] = field(default_factory=dict)
    epochs: list[dict[str, float]] = field(default_factory=list)
    radii: RadiiSummary | None = None
    certificate_mode: CertificateMode | None = None
    attack: AttackSummary | None = None
    failure_reason: str | None = None
    run_id: str | None = None
    model_uri: str | None = None
    model: nn.Module | None = None
    timings: dict[str, float] = field(default_factory=dict)
    pruned_at_epoch: int | None = None


def run_trial(
    spec: TrialSpec,
    *,
    tracking: tracking.TrackingConfig | None,
    experiment: str | None = None,
    tags: dict[str, str] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    should_prune: Callable[[dict[str, float]], bool] | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
    data_roots: list[Path] | None = None,
    device: str | None = None,
    threads: int | None = None,
) -> TrialResult:
    """Train, evaluate and record the trial ``spec`` describes.

    Args:
        spec: the trial.
        tracking: where to log the MLflow run; ``None`` logs nothing.
        experiment: the MLflow experiment; default ``liptune/train/{spec.name}``.
        tags: extra run tags (e.g. ``liptune.study_id``, ``liptune.trial_number``).
        should_stop: asked before every epoch; True cancels the trial.
        on_epoch: called with each epoch's record.
        should_prune: asked with each epoch's record after ``on_epoch``; True prunes the trial.
        on_progress: called as ``(epoch, step, n_steps)`` every few dozen steps of an epoch.
        data_roots: directories data may be read from; default those of the data directory.
        device: overrides ``spec.training.device``.
        threads: overrides ``spec.training.threads`` (torch's intra-op threads, restored after).
    """
    timings: dict[str, float] = {}
    started_at = time.time()
    roots = data_roots if data_roots is not None else default_data_roots(liptune_home())
    test: Predictions | None = None
    try:
        with _torch_threads(threads or spec.training.threads):
            with _timed(timings, "data"):
                splits = load_dataset(spec.dataset, data_roots=roots, seed=spec.seed)
            torch_device = resolve_device(device or spec.training.device)
            with _init_lock:
                torch.manual_seed(spec.seed)
                model = build_model(spec.model, splits.input_shape, splits.num_classes)
            loss_fn = build_loss(spec.loss, splits.task)
            model.to(torch_device)
            mode = certificate_mode(model)
            with _timed(timings, "training"):
                run = train(
                    model,
                    loss_fn,
                    splits,
                    spec.training,
                    eps=spec.eps,
                    mode=mode,
                    device=torch_device,
                    seed=spec.seed,
                    should_stop=should_stop,
                    on_epoch=on_epoch,
                    should_prune=should_prune,
                    on_progress=on_progress,
                )
            result = TrialResult(
                status=TrialOutcome.COMPLETED,
                epochs=run.epochs,
                certificate_mode=mode,
                timings=timings,
            )
            if run.failure_reason is not None:
                result.status, result.failure_reason = TrialOutcome.FAILED, run.failure_reason
            elif run.cancelled:
                result.status = TrialOutcome.CANCELLED
            elif run.pruned_at_epoch is not None:
                result.status, result.pruned_at_epoch = TrialOutcome.PRUNED, run.pruned_at_epoch
            else:
                with full_precision():
                    test = _finish(result, model, splits, spec, run, torch_device)
            if tracking is not None:
                with _timed(timings, "tracking"):
                    _record(
                        result,
                        test,
                        spec,
                        run,
                        splits,
                        tracking,
                        experiment,
                        tags or {},
                        started_at,
                    )
    except Exception as error:
        # Leaving the handler drops the traceback's frames, and with them what the trial had
        # allocated: the worker goes on to its next trial.
        return _failed_allocation(error, spec, device, timings)
    return result


def train_conditioned(
    spec: StudySpec,
    *,
    should_stop: Callable[[], bool] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    data_roots: list[Path] | None = None,
    device: str | None = None,
    threads: int | None = None,
) -> tuple[ConditionedSequential, TrainingRun, DataSplits]:
    """Train a conditional study's one network (:mod:`worker.trial._conditional`) for
    ``spec.training.epochs`` epochs on the data split of the study's seed, with
    :func:`worker.trial._training.train` (each example at its own loss parameters; the epoch records
    are the network's at the middle of the ranges). Returns the network (eval mode, on the CPU),
    the run (``cancelled`` or ``failure_reason`` as a trial's) and the splits. Allocation
    failures and unusable specs raise, as :func:`run_trial`'s would before training."""
    space = ConditionSpace.of(spec)
    reference = spec.trial_spec({"loss": space.family, **space.reference()}, seed=spec.seed)
    roots = data_roots if data_roots is not None else default_data_roots(liptune_home())
    with _torch_threads(threads or spec.training.threads):
        splits = load_dataset(spec.dataset, data_roots=roots, seed=spec.seed)
        torch_device = resolve_device(device or spec.training.device)
        with _init_lock:
            torch.manual_seed(spec.seed)
            network = build_network(spec, splits.input_shape, splits.num_classes)
        network.to(torch_device)
        model, loss_fn = training_view(
            network,
            space,
            build_loss(space.loss_spec(), splits.task),
            seed=spec.seed,
            device=torch_device,
        )
        run = train(
            model,
            loss_fn,
            splits,
            spec.training,
            eps=reference.eps,
            mode=certificate_mode(network),
            device=torch_device,
            seed=spec.seed,
            should_stop=should_stop,
            on_epoch=on_epoch,
        )
    return network.cpu().eval(), run, splits


def run_conditioned_trial(
    spec: TrialSpec,
    network: ConditionedSequential,
    condition: torch.Tensor,
    *,
    network_run_id: str | None,
    tracking: tracking.TrackingConfig | None,
    experiment: str | None = None,
    tags: dict[str, str] | None = None,
    data_roots: list[Path] | None = None,
    device: str | None = None,
    threads: int | None = None,
) -> TrialResult:
    """One trial of a conditional study: the study's trained conditioned ``network`` exported at
    ``condition`` (:func:`liptune.export.vanilla_export_at`), then exactly what a trained trial's
    end does (:func:`_finish`: the guaranteed bound checked, certificates from it, the attack
    check, metrics; :func:`_record`: the MLflow run with the same parameters, metrics, models,
    radii and tags, plus :data:`~worker.trial._conditional.NETWORK_RUN_TAG`). ``spec`` is the
    trial's spec at the study's seed (the data split the network was trained on). The trial trains
    nothing: no epoch records, ``training_time`` 0."""
    timings: dict[str, float] = {}
    started_at = time.time()
    roots = data_roots if data_roots is not None else default_data_roots(liptune_home())
    test: Predictions | None = None
    run = TrainingRun()
    try:
        with _torch_threads(threads or spec.training.threads):
            with _timed(timings, "data"):
                splits = load_dataset(spec.dataset, data_roots=roots, seed=spec.seed)
            torch_device = resolve_device(device or spec.training.device)
            result = TrialResult(
                status=TrialOutcome.COMPLETED,
                certificate_mode=certificate_mode(network),
                timings=timings,
            )

            def export(model: nn.Module) -> nn.Module:
                return vanilla_export_at(cast(ConditionedSequential, model), condition).to(
                    torch_device
                )

            with full_precision():
                test = _finish(result, network, splits, spec, run, torch_device, export=export)
            if tracking is not None:
                run_tags = {"liptune.strategy": "conditional", **(tags or {})}
                if network_run_id is not None:
                    run_tags[NETWORK_RUN_TAG] = network_run_id
                with _timed(timings, "tracking"):
                    _record(
                        result,
                        test,
                        spec,
                        run,
                        splits,
                        tracking,
                        experiment,
                        run_tags,
                        started_at,
                    )
    except Exception as error:
        # Leaving the handler drops the traceback's frames, and with them what the trial had
        # allocated: the worker goes on to its next trial.
        return _failed_allocation(error, spec, device, timings)
    return result


def _failed_allocation(
    error: Exception, spec: TrialSpec, device: str | None, timings: dict[str, float]
) -> TrialResult:
    """The failed result of a trial whose allocation failed; any other error is raised again."""
    if not allocation_failed(error):
        raise error
    return TrialResult(
        status=TrialOutcome.FAILED,
        failure_reason=out_of_memory_reason(spec, device or spec.training.device, error),
        timings=timings,
    )


def allocation_failed(error: BaseException) -> bool:
    """Whether ``error`` is a failed memory allocation (host or device) rather than a bug."""
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


_ALLOCATION = re.compile(r"allocate (\d+) bytes|[Tt]ried to allocate ([\d.]+ [KMGTP]?i?B)")


def out_of_memory_reason(spec: TrialSpec, device: str, error: BaseException) -> str:
    """``out of memory: ...`` naming the model as the spec gives it, the batch size, the device
    and, where the allocator said it, the size of the allocation that failed."""
    fields = spec.model.model_dump(mode="json", exclude_defaults=True)
    model = json.dumps({"name": spec.model.name, **fields})
    reason = f"out of memory: model {model} at batch size {spec.training.batch_size} on {device}"
    match = _ALLOCATION.search(str(error))
    if match is None:
        return reason
    size = match[2] or f"{int(match[1]) / 2**30:.2f} GiB"
    return f"{reason}: could not allocate {size}"


def _finish(
    result: TrialResult,
    model: nn.Module,
    splits: DataSplits,
    spec: TrialSpec,
    run: TrainingRun,
    device: torch.device,
    export: Callable[[nn.Module], nn.Module] = vanilla_export,
) -> Predictions | None:
    """Export (``export(model)``: a trained network's plain form, or a conditioned network's at
    one condition), bound and evaluate the trained model, filling ``result`` (or failing it);
    the test split's predictions."""
    mode = result.certificate_mode
    assert mode is not None, "run_trial records the certificate mode before finishing a trial"
    timings = result.timings
    with _timed(timings, "export"):
        exported = export(model)
    with _timed(timings, "lipschitz_bound"):
        bound, estimate = head_constants(exported, splits.input_shape, mode)
    if not bound <= 1.0 + LIPSCHITZ_TOLERANCE:
        result.status = TrialOutcome.FAILED
        result.failure_reason = (
            f"the guaranteed Lipschitz bound of the exported model's {mode} "
            f"head is {bound:.6f} > 1 + {LIPSCHITZ_TOLERANCE:g}: its layers' constraints did not "
            "hold"
        )
        return None
    with _timed(timings, "evaluation"):
        test = predict(exported, splits.test.x, splits.test.y, mode, lipschitz=bound)
        metrics = accuracy_metrics(test, spec.eps)
        metrics.update(robustness_metrics(test, splits.test.y, mode))
    with _timed(timings, "attack"):
        result.attack = _attack_certificates(exported, splits, test, spec.seed)
    if result.attack.violations:
        _log.error(
            "%s: %d of %d attacked test points have an adversarial example closer than their "
            "certificate: the bound does not hold",
            spec.name,
            result.attack.violations,
            result.attack.points,
        )
    if spec.pgd is not None:
        with _timed(timings, "pgd"):
            metrics.update(
                pgd_metrics(
                    exported, splits.test.x, splits.test.y, spec.pgd, seed=spec.seed, device=device
                )
            )
    metrics["training_time"] = run.seconds
    metrics["lipschitz_bound"] = bound
    metrics["lipschitz_estimate"] = estimate
    metrics["num_parameters"] = float(sum(p.numel() for p in model.parameters()))
    result.metrics = metrics
    result.radii = test.summary()
    result.model = exported.cpu()
    return test


def attack_check(
    model: nn.Module,
    spec: TrialSpec,
    certificate_mode: str,
    *,
    data_roots: list[Path] | None = None,
) -> AttackSummary:
    """The attack check of a trained trial's (exported) ``model``, as the trial itself runs it:
    certificates (``certificate_mode``, the trial record's) from the guaranteed head bound on
    the test split of ``spec``'s data, then
    :func:`liptune.attacks.minimal_l2_attack` on the same seeded ``ATTACK_POINTS`` correctly
    classified test points (what ``POST /studies/{id}/trials/{n}/attack`` runs)."""
    roots = data_roots if data_roots is not None else default_data_roots(liptune_home())
    splits = load_dataset(spec.dataset, data_roots=roots, seed=spec.seed)
    model = model.cpu().eval()
    # A stored record's string: head_constants and predict_with_certificates raise ValueError
    # for anything but a certificate mode before it is used as one.
    mode = cast(CertificateMode, certificate_mode)
    with full_precision():
        bound, _ = head_constants(model, splits.input_shape, mode)
        test = predict(model, splits.test.x, splits.test.y, mode, lipschitz=bound)
        return _attack_certificates(model, splits, test, spec.seed)


def _attack_certificates(
    model: nn.Module, splits: DataSplits, test: Predictions, seed: int
) -> AttackSummary:
    """:func:`liptune.attacks.minimal_l2_attack` on a seeded sample of ``ATTACK_POINTS``
    correctly classified test points, compared with their certificates."""
    correct = test.correct.nonzero().flatten()
    generator = torch.Generator().manual_seed(seed)
    sample = correct[torch.randperm(len(correct), generator=generator)[:ATTACK_POINTS]]
    if len(sample) == 0:
        return AttackSummary(points=0, violations=0)
    distances = minimal_l2_attack(model, splits.test.x[sample], splits.test.y[sample])
    radii = test.radii[sample]
    pairs = tuple(
        (radius, distance if math.isfinite(distance) else None)
        for radius, distance in zip(radii.tolist(), distances.tolist(), strict=True)
    )
    return AttackSummary(**certificate_check(radii, distances), pairs=pairs)


def _run_params(spec: TrialSpec) -> dict[str, str]:
    params = tracking.flatten_params(spec.model_dump(mode="json"))
    for name in FAMILY_PARAMS[spec.loss.family]:
        params[f"loss.{name}"] = str(spec.loss.value(name))
    return params


def _record(
    result: TrialResult,
    test: Predictions | None,
    spec: TrialSpec,
    run: TrainingRun,
    splits: DataSplits,
    config: tracking.TrackingConfig,
    experiment: str | None,
    tags: dict[str, str],
    started_at: float,
) -> None:
    """Log the trial's MLflow run and store its id (and the model URI) in ``result``."""
    run_tags = {
        "liptune.loss_family": spec.loss.family,
        "liptune.dataset": spec.dataset.name,
        "liptune.certificate_mode": result.certificate_mode or "",
        "liptune.status": str(result.status),
        **tags,
    }
    if result.failure_reason:
        run_tags[FAILURE_TAG] = result.failure_reason
    trial_number = tags.get(tracking.TRIAL_NUMBER_TAG)
    run_id = tracking.start_run(
        config,
        experiment=experiment or f"liptune/train/{spec.name}",
        run_name=f"{spec.name}-{trial_number}" if trial_number is not None else spec.name,
        params=_run_params(spec),
        tags=run_tags,
        start_time=started_at,
    )
    result.run_id = run_id
    try:
        _write_run(result, test, spec, run, splits, config, run_id)
    except tracking.TrackingUnavailable:
        tracking.abandon_run(config, run_id)  # ended as FAILED once MLflow is back
        raise


def _write_run(
    result: TrialResult,
    test: Predictions | None,
    spec: TrialSpec,
    run: TrainingRun,
    splits: DataSplits,
    config: tracking.TrackingConfig,
    run_id: str,
) -> None:
    """Log the outcome to the started run ``run_id`` and end it."""
    if result.status == TrialOutcome.FAILED:
        tracking.end_run(config, run_id, "FAILED")
        return
    if result.status in (TrialOutcome.CANCELLED, TrialOutcome.PRUNED) or test is None:
        tracking.log_metrics(config, run_id, {}, epochs=run.epochs, end_times=run.end_times)
        tracking.end_run(config, run_id, "KILLED")
        return
    # A trial with test predictions went through _finish, which exported its model.
    assert result.model is not None and result.certificate_mode is not None, (
        "a finished trial has an exported model and a certificate mode"
    )
    model = result.model
    # The model first: metrics logged after it are linked to it without MLflow re-reading them.
    certificate = Certificate(
        result.certificate_mode, result.metrics["lipschitz_bound"], splits.input_shape
    )
    result.model_uri = tracking.log_model(config, run_id, model, splits.test.x[:2], certificate)
    tracking.log_metrics(
        config,
        run_id,
        result.metrics,
        epochs=run.epochs,
        end_times=run.end_times,
        model_uri=result.model_uri,
    )
    with tempfile.TemporaryDirectory() as folder, _timed(result.timings, "onnx"), _quiet_onnx():
        onnx_path = export_onnx(
            model,
            Path(folder) / tracking.ONNX_ARTIFACT,
            splits.input_shape,
            lipschitz=certificate.lipschitz,
        )
        tracking.log_onnx(config, run_id, onnx_path, splits.test.x[:2])
    tracking.log_radii(
        config,
        run_id,
        radii=test.radii.numpy(),
        correct=test.correct.numpy(),
        labels=splits.test.y.numpy(),
    )
    tracking.end_run(config, run_id, "FINISHED")


@contextmanager
def _quiet_onnx() -> Iterator[None]:
    """Silence the ONNX exporter's notices (missing torchvision ops, tracer warnings)."""
    logger = logging.getLogger("torch.onnx")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(previous)


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - started


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the block (process-wide), then restore it."""
    if threads is None:
        yield
        return
    with _threads_lock:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        with _threads_lock:
            torch.set_num_threads(previous)
