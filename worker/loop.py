"""The worker loop: run trials of every running study, oldest study first, until stopped.

One worker runs one trial at a time:

1. for each running study (:func:`worker.study._studies.running_studies`), oldest first, it fails
the
   trials of dead workers (no heartbeat for the grace period) and re-enqueues their parameters,
   then claims a slot of the study's budget (:mod:`worker.study._claims`);
2. with a slot, it asks Optuna (the study's sampler rebuilt from the spec, seeded for this
   worker), suggests the loss parameters (:mod:`worker.search._space`), and runs the trial
   (:func:`worker.trial._run.run_trial`) while a thread heartbeats the claim and the Optuna trial;
3. it tells Optuna the objective values (in the order of ``spec.objectives``) with the
   requirements as constraints, or FAIL with ``liptune.failure_reason``, or PRUNED when the
   study's pruner (:mod:`worker.search._pruning`) stopped it at a rung: its slot counts as used (the
   budget is ``n_trials`` trials started), its record keeps the epochs it reached and
   ``pruned_at_epoch``.

What a trial records beyond Optuna's params and values is its
:class:`worker.study._record.TrialAttributes` (worker, epochs, metrics, radii, MLflow ids, failure
reason, retries); every read and write of the databases goes through
:class:`worker.study._store.StudyStore`, one method per storage operation. In a single-objective
study each epoch's validation value of the objective is also reported to Optuna (``trial.report``),
so optuna-dashboard draws it; Optuna has no intermediate values for several objectives, where the
epochs are in the record only.

A conditional study (``strategy: conditional``, :mod:`worker.trial._conditional`) first needs its
one conditioned network. The worker that claims the study's training lease
(:meth:`worker.study.StudyStore.claim_training`, heartbeated like a trial's claim) trains it,
logs it to MLflow and records it on the study (``liptune.conditioned``); the others leave the
study to it meanwhile. Every worker then loads the network from that MLflow run once (kept in
memory per study) and runs the study's trials as evaluations of it
(:func:`worker.trial.run_conditioned_trial`). A trainer that dies stops heartbeating: its lease
is freed as stale like a trial's claim and the next worker trains again. A training that
diverges fails the study; one that is stopped (worker stopping, study cancelled) frees the lease.

Stopping: :meth:`Worker.stop` (SIGTERM, SIGINT) makes the running trial stop at its next epoch
boundary; it ends as FAIL (reason ``worker stopped``), its slot is freed, its parameters are
re-enqueued, and the worker exits: nothing is left RUNNING. A cancelled study is seen between
epochs the same way (reason ``cancelled``, nothing re-enqueued).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from pydantic import ValidationError

from liptune.nn import ConditionedSequential
from worker.common._retry import retrying
from worker.search._pruning import MOASHA
from worker.search._samplers import build_sampler, worker_seed
from worker.search._space import trial_params
from worker.spec import StudySpec
from worker.study._claims import Claim, ClaimState
from worker.study._engine import DEFAULT_GRACE_PERIOD_S, DEFAULT_HEARTBEAT_INTERVAL_S
from worker.study._record import TrialAttributes
from worker.study._store import StudyStore
from worker.study._studies import (
    SPEC_ATTR,
    FrozenStudy,
    StudyStatus,
    experiment_name,
    load_spec,
)
from worker.tracking._mlflow import (
    TRIAL_NUMBER_TAG,
    TrackingConfig,
    TrackingUnavailable,
    end_abandoned_runs,
    end_orphaned_runs,
)
from worker.trial._conditional import ConditionSpace, load_network, log_network
from worker.trial._devices import study_memory_bytes
from worker.trial._run import (
    TrialOutcome,
    TrialResult,
    allocation_failed,
    run_conditioned_trial,
    run_trial,
    train_conditioned,
)
from worker.trial.datasets import set_data_roots

logger = logging.getLogger("liptune.worker")

WORKER_STOPPED = "worker stopped"
#: Seconds between two reads of a study's status by a running trial.
STATUS_CHECK_INTERVAL_S = 1.0
#: A study ends as failed after more than max(n_trials, this) failed trials.
MIN_FAILURE_BUDGET = 5


def trial_threads(worker_threads: int | None, spec_threads: int | None) -> int | None:
    """The CPU threads a trial runs with: the spec's ``training.threads`` when it asks for
    some, never more than the worker's ``--threads`` (its share of the cores); else the
    worker's; ``None`` leaves torch's default."""
    if worker_threads is None or spec_threads is None:
        return spec_threads or worker_threads
    return min(worker_threads, spec_threads)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def failure_budget(spec: StudySpec) -> int:
    """How many trials of a study may fail before the study is failed."""
    return max(spec.n_trials, MIN_FAILURE_BUDGET)


@dataclass(frozen=True)
class WorkerOptions:
    """What a worker connects to and how it runs trials (``liptune worker``'s options)."""

    storage_url: str
    tracking: TrackingConfig | None = None
    data_roots: list[Path] | None = None
    device: str | None = None
    threads: int | None = None
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL_S
    grace_period: int = DEFAULT_GRACE_PERIOD_S
    worker_id: str = field(default_factory=default_worker_id)
    max_trials: int | None = None
    exit_when_idle: bool = False
    idle_poll_min_s: float = 0.5
    idle_poll_max_s: float = 10.0
    #: Device memory one trial may plan to use (bytes); a study whose trials are estimated
    #: (:func:`worker.trial._devices.study_memory_bytes`) above it is left to other workers.
    memory_budget: int | None = None


class Heartbeat:
    """A thread that marks a claim (and, once attached, its Optuna trial) alive every
    ``interval`` seconds until stopped."""

    def __init__(self, store: StudyStore, claim: Claim, interval: float) -> None:
        self._store = store
        self._claim = claim
        self._interval = interval
        self._trial_id: int | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liptune-heartbeat", daemon=True)
        #: Set when another worker freed the claim as stale: this trial's result will not count.
        self.lost = False

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._thread.join()

    def attach(self, trial_id: int) -> None:
        self._trial_id = trial_id

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                if not self._store.heartbeat(self._claim, self._trial_id):
                    self.lost = True
            except Exception:  # a transient database error must not kill the heartbeat
                logger.exception("heartbeat of claim %s failed", self._claim.claim_id)


class Worker:
    """Runs trials of every running study until :meth:`stop` (or its trial limit)."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        # Every storage operation rides out a database outage (worker.common._retry).
        self.store = retrying(
            StudyStore(
                options.storage_url,
                heartbeat_interval=options.heartbeat_interval,
                grace_period=options.grace_period,
            )
        )
        self.store.require_schema()
        self.trials_run = 0
        self._stopping = threading.Event()
        self._samplers: dict[str, optuna.samplers.BaseSampler] = {}
        self._reaped_at: dict[str, float] = {}
        # study name -> {trial id: when first seen RUNNING without a live claim (monotonic)}
        self._orphans_seen: dict[str, dict[int, float]] = {}
        self._too_large: dict[str, bool] = {}
        self._unreadable: set[str] = set()
        # conditional studies: study name -> (trained network, its MLflow run id)
        self._networks: dict[str, tuple[ConditionedSequential, str | None]] = {}
        self._left_to_trainer: set[str] = set()
        if options.data_roots is not None:
            set_data_roots(options.data_roots)

    # ------------------------------------------------------------------ loop

    def stop(self) -> None:
        """Stop after the current trial; that trial stops at its next epoch boundary."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> int:
        """Run trials until stopped, ``max_trials`` are done, or (``exit_when_idle``) no study
        has a free slot; returns the number of trials run."""
        idle = self.options.idle_poll_min_s
        while not self.stopping:
            if self.options.max_trials is not None and self.trials_run >= self.options.max_trials:
                break
            if self.run_next():
                idle = self.options.idle_poll_min_s
                continue
            if self.options.exit_when_idle:
                break
            self._stopping.wait(idle)
            idle = min(2 * idle, self.options.idle_poll_max_s)
        return self.trials_run

    def run_next(self) -> bool:
        """Claim and run one trial of the oldest study with a free slot; ``False`` if none."""
        running = self.store.running_studies()
        # Dead workers' trials of stopped (e.g. cancelled) studies must not stay RUNNING either.
        running_names = {frozen.study_name for _, frozen in running}
        for name in self.store.studies_with_running_claims() - running_names:
            self._reap(name, spec=None)
        for study_id, frozen in running:
            if self.stopping:
                return False
            name = frozen.study_name
            spec = self._spec(name, frozen)
            if spec is None:
                continue
            self._reap(name, spec)
            counts = self.store.claim_counts(name)
            if counts.failed > failure_budget(spec):
                self._set_status(
                    name,
                    StudyStatus.FAILED,
                    f"{counts.failed} trials failed, more than the study allows "
                    f"({failure_budget(spec)}); see the trials' liptune.failure_reason",
                )
                continue
            if self._too_large_for_device(name, spec):
                continue
            # A conditional study's trials need its network (trained here, or loaded) first.
            if (
                spec.conditional
                and counts.running + counts.complete < spec.n_trials
                and self._conditioned_network(study_id, name, spec) is None
            ):
                continue
            claim = self.store.claim(name, n_trials=spec.n_trials, worker_id=self.options.worker_id)
            if claim is None:
                if counts.complete >= spec.n_trials:
                    self._set_status(name, StudyStatus.COMPLETED)
                continue
            self._run_claim(study_id, spec, claim)
            self.trials_run += 1
            return True
        return False

    def _spec(self, study_name: str, frozen: FrozenStudy) -> StudySpec | None:
        """The study's spec, or ``None`` when this worker cannot read it: a spec naming a model
        or data-set plugin that is not installed here is left to the workers that have it
        (logged once per study)."""
        try:
            return load_spec(frozen)
        except ValidationError as error:
            if study_name not in self._unreadable:
                self._unreadable.add(study_name)
                data = frozen.user_attrs.get(SPEC_ATTR) or {}
                logger.warning(
                    "%s: left to other workers, this one cannot run its spec (model %r, data set "
                    "%r: is a plugin missing here?): %s",
                    study_name,
                    (data.get("model") or {}).get("name"),
                    (data.get("dataset") or {}).get("name"),
                    "; ".join(item["msg"] for item in error.errors()),
                )
            return None

    def _too_large_for_device(self, study_name: str, spec: StudySpec) -> bool:
        """Whether the study's trials would exceed :attr:`WorkerOptions.memory_budget`
        (estimated once per study, logged the first time)."""
        budget = self.options.memory_budget
        if budget is None:
            return False
        if study_name not in self._too_large:
            estimate = study_memory_bytes(spec)
            self._too_large[study_name] = estimate > budget
            if estimate > budget:
                logger.warning(
                    "%s: a trial needs about %.0f MiB of device memory, more than this "
                    "worker's %.0f MiB per trial: left to other workers",
                    study_name,
                    estimate / 2**20,
                    budget / 2**20,
                )
        return self._too_large[study_name]

    # ------------------------------------------------------------------ conditional studies

    def _conditioned_network(
        self, study_id: str, study_name: str, spec: StudySpec
    ) -> tuple[ConditionedSequential, str | None] | None:
        """The conditional study's trained network and its MLflow run id: from memory, from its
        MLflow run, or trained here under the study's training lease; ``None`` while another
        worker trains it (or when it cannot be had: the study is failed then)."""
        cached = self._networks.get(study_name)
        if cached is not None:
            return cached
        record = self.store.conditioned_network(study_name)
        if record.get("status") == "trained":
            return self._load_network(study_name, spec, record)
        failed = self.store.training_counts(study_name).failed
        if failed > failure_budget(spec):
            self._set_status(
                study_name,
                StudyStatus.FAILED,
                f"the conditioned network's training was started {failed + 1} times and never "
                "finished (its workers stopped or died)",
            )
            return None
        lease = self.store.claim_training(study_name, worker_id=self.options.worker_id)
        if lease is None:
            if study_name not in self._left_to_trainer:
                self._left_to_trainer.add(study_name)
                logger.info(
                    "%s: its conditioned network is being trained by worker %s; left to it",
                    study_name,
                    record.get("worker"),
                )
            return None
        return self._train_network(study_id, study_name, spec, lease, record)

    def _load_network(
        self, study_name: str, spec: StudySpec, record: dict[str, Any]
    ) -> tuple[ConditionedSequential, str | None] | None:
        run_id = record.get("mlflow_run_id")
        if run_id is None or self.options.tracking is None:
            if study_name not in self._left_to_trainer:
                self._left_to_trainer.add(study_name)
                logger.warning(
                    "%s: its conditioned network was trained by worker %s without MLflow: this "
                    "worker cannot load it, left to that worker",
                    study_name,
                    record.get("worker"),
                )
            return None
        try:
            network = load_network(self.options.tracking, run_id, spec)
        except TrackingUnavailable as error:
            logger.warning("%s: conditioned network not loaded yet: %s", study_name, error)
            return None
        logger.info("%s: loaded its conditioned network from MLflow run %s", study_name, run_id)
        self._networks[study_name] = (network, run_id)
        return self._networks[study_name]

    def _train_network(
        self, study_id: str, study_name: str, spec: StudySpec, lease: Claim, before: dict[str, Any]
    ) -> tuple[ConditionedSequential, str | None] | None:
        """Train the study's conditioned network under ``lease``, log it and record it."""
        spent_before = int(before.get("epochs_spent", 0))
        record: dict[str, Any] = {
            "status": "training",
            "worker": self.options.worker_id,
            "epochs": 0,
            "epochs_spent": spent_before,
        }
        self.store.set_conditioned_network(study_name, record)
        logger.info(
            "%s: training its conditioned network (%d epochs)", study_name, spec.training.epochs
        )

        def on_epoch(epoch: dict[str, Any]) -> None:
            record.update(
                epochs=int(epoch["epoch"]), epochs_spent=spent_before + int(epoch["epoch"])
            )
            self.store.set_conditioned_network(study_name, record)

        started_at = time.time()
        with Heartbeat(self.store, lease, self.options.heartbeat_interval) as beat:
            try:
                network, run, splits = train_conditioned(
                    spec,
                    should_stop=self._should_stop_name(study_name),
                    on_epoch=on_epoch,
                    data_roots=self.options.data_roots,
                    device=self.options.device,
                    threads=trial_threads(self.options.threads, spec.training.threads),
                )
                if beat.lost:
                    raise _LeaseLost
                run_id = None
                if run.failure_reason is None and not run.cancelled and self.options.tracking:
                    run_id = log_network(
                        self.options.tracking,
                        experiment=experiment_name(spec, study_id),
                        spec=spec,
                        study_id=study_id,
                        network=network,
                        run=run,
                        input_shape=tuple(splits.input_shape),
                        num_classes=splits.num_classes,
                        worker_id=self.options.worker_id,
                        started_at=started_at,
                    )
            except _LeaseLost:
                logger.warning(
                    "%s: the training lease was freed as stale by another worker; this "
                    "training is discarded",
                    study_name,
                )
                return None
            except TrackingUnavailable as error:  # trained, but not stored: again later
                logger.warning("%s: conditioned network not logged: %s", study_name, error)
                record.update(status="pending")
                self.store.set_conditioned_network(study_name, record)
                self.store.finish_claim(lease, ClaimState.FAILED, f"MLflow: {error}")
                return None
            except Exception as error:
                logger.exception("%s: the conditioned network's training crashed", study_name)
                what = "out of memory" if allocation_failed(error) else type(error).__name__
                reason = f"the conditioned network's training failed: {what}: {error}"
                self._network_failed(study_name, lease, record, reason)
                return None
        if run.failure_reason is not None:
            reason = f"the conditioned network's training failed: {run.failure_reason}"
            self._network_failed(study_name, lease, record, reason)
            return None
        if run.cancelled:
            why = WORKER_STOPPED if self.stopping else "study not running"
            record.update(status="pending")
            self.store.set_conditioned_network(study_name, record)
            self.store.finish_claim(lease, ClaimState.FAILED, why)
            logger.info("%s: conditioned network's training stopped (%s)", study_name, why)
            return None
        record.update(
            status="trained",
            epochs=len(run.epochs),
            epochs_spent=spent_before + len(run.epochs),
            seconds=run.seconds,
            mlflow_run_id=run_id,
        )
        # The record first: a worker that finds the lease complete finds the network's run.
        self.store.set_conditioned_network(study_name, record)
        if not self.store.finish_claim(lease, ClaimState.COMPLETE):
            logger.warning(
                "%s: the training lease was freed as stale meanwhile; the logged network stands",
                study_name,
            )
        logger.info(
            "%s: conditioned network trained in %.1f s (%d epochs), MLflow run %s",
            study_name,
            run.seconds,
            len(run.epochs),
            run_id,
        )
        self._networks[study_name] = (network, run_id)
        return self._networks[study_name]

    def _network_failed(
        self, study_name: str, lease: Claim, record: dict[str, Any], reason: str
    ) -> None:
        record.update(status="failed", failure_reason=reason)
        self.store.set_conditioned_network(study_name, record)
        self.store.finish_claim(lease, ClaimState.FAILED, reason)
        self._set_status(study_name, StudyStatus.FAILED, reason)

    # ------------------------------------------------------------------ one trial

    def _sampler(self, study_name: str, spec: StudySpec) -> optuna.samplers.BaseSampler:
        if study_name not in self._samplers:
            seed = worker_seed(spec.seed, f"{self.options.worker_id}/{os.getpid()}")
            self._samplers[study_name] = build_sampler(spec, seed)
        return self._samplers[study_name]

    def _run_claim(self, study_id: str, spec: StudySpec, claim: Claim) -> None:
        study = self.store.load_study(claim.study_name, self._sampler(claim.study_name, spec))
        with Heartbeat(self.store, claim, self.options.heartbeat_interval) as beat:
            try:
                trial = self.store.ask(study)
            except Exception as error:  # the slot is freed; the failure budget bounds retries
                logger.exception("asking %s for a trial failed", claim.study_name)
                self.store.finish_claim(claim, ClaimState.FAILED, f"ask failed: {error!r}")
                return
            trial_id = self.store.attach(claim, trial)
            beat.attach(trial_id)
            self.store.write_record(trial_id, TrialAttributes(worker=self.options.worker_id))
            try:
                result = self._train(study, study_id, spec, trial)
            except Exception as error:
                logger.exception("trial %d of %s crashed", trial.number, claim.study_name)
                reason = f"{type(error).__name__}: {error}"
                self._fail(study, trial, claim, reason, traceback.format_exc(limit=5))
                if isinstance(error, TrackingUnavailable):  # trained, but no record: again
                    self._retry(study, spec, self.store.get_trial(trial_id))
                return
            if beat.lost:
                self._fail(study, trial, claim, "its claim was freed as stale by another worker")
            else:
                self._tell(study, spec, trial, claim, result)
        # Housekeeping once the trial is told, never before: MLflow has just answered.
        if self.options.tracking is not None and result.run_id is not None:
            self._end_abandoned_runs(self.options.tracking)
            self._end_orphaned_runs(self.options.tracking, study, experiment_name(spec, study_id))

    def _end_abandoned_runs(self, config: TrackingConfig) -> None:
        """End as FAILED the MLflow runs earlier trials of this worker left RUNNING when MLflow
        went away while they were written (:func:`worker.tracking._mlflow.end_abandoned_runs`)."""
        try:
            ended = end_abandoned_runs(config)
        except TrackingUnavailable as error:  # gone again: the next logged trial tries again
            logger.warning("abandoned MLflow runs not ended yet: %s", error)
            return
        if ended:
            logger.info("ended MLflow runs abandoned in an outage as FAILED: %s", ended)

    def _end_orphaned_runs(
        self, config: TrackingConfig, study: optuna.Study, experiment: str
    ) -> None:
        """End as FAILED the study's MLflow runs whose writer died: RUNNING runs of trials that
        are no longer RUNNING (:func:`worker.tracking._mlflow.end_orphaned_runs`)."""
        try:
            states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
            ended = end_orphaned_runs(config, experiment, states)
        except Exception:  # housekeeping: the trained trial is told whatever the stores say
            logger.exception("orphaned MLflow runs of %s not ended yet", experiment)
            return
        if ended:
            logger.info("ended MLflow runs whose worker stopped as FAILED: %s", ended)

    def _train(
        self, study: optuna.Study, study_id: str, spec: StudySpec, trial: optuna.Trial
    ) -> TrialResult:
        if spec.conditional:
            return self._evaluate(study, study_id, spec, trial)
        params = self.store.suggest(trial, spec.search_space)
        trial_spec = spec.trial_spec(params, seed=spec.trial_seed(trial.number))
        trial_id = self.store.trial_id(trial)
        epochs: list[dict[str, Any]] = []
        # Optuna keeps intermediate values for one objective only.
        reported = f"val_{spec.objectives[0].key}" if len(spec.objectives) == 1 else None

        def on_epoch(record: dict[str, Any]) -> None:
            epochs.append(record)
            self.store.write_record(trial_id, TrialAttributes(epochs=epochs), "epochs")
            if reported is not None and reported in record:
                self.store.report(trial, float(record[reported]), int(record["epoch"]))

        pruner = MOASHA(spec) if spec.pruner.name == "mo-asha" else None

        def should_prune(record: dict[str, Any]) -> bool:
            # on_epoch has committed this epoch: the rung is ranked on committed records only
            if pruner is None or int(record["epoch"]) not in pruner.rungs:
                return False
            return pruner.decide(trial.number, epochs, self.store.epoch_records(study))

        logger.info("%s trial %d: %s", study.study_name, trial.number, params)
        return run_trial(
            trial_spec,
            tracking=self.options.tracking,
            experiment=experiment_name(spec, study_id),
            tags=_run_tags(study_id, trial.number, params),
            should_stop=self._should_stop(study),
            on_epoch=on_epoch,
            should_prune=should_prune if pruner is not None else None,
            data_roots=self.options.data_roots,
            device=self.options.device,
            threads=trial_threads(self.options.threads, spec.training.threads),
        )

    def _evaluate(
        self, study: optuna.Study, study_id: str, spec: StudySpec, trial: optuna.Trial
    ) -> TrialResult:
        """A conditional study's trial: its network evaluated at the suggested parameters, on
        the data split it was trained on (the study's seed)."""
        network, run_id = self._networks[study.study_name]
        params = self.store.suggest(trial, spec.search_space)
        condition = ConditionSpace.of(spec).condition(params)  # ValueError: the trial fails
        trial_spec = spec.trial_spec(params, seed=spec.evaluation_seed(trial.number))
        logger.info("%s trial %d (evaluation): %s", study.study_name, trial.number, params)
        return run_conditioned_trial(
            trial_spec,
            network,
            condition,
            network_run_id=run_id,
            tracking=self.options.tracking,
            experiment=experiment_name(spec, study_id),
            tags=_run_tags(study_id, trial.number, params),
            data_roots=self.options.data_roots,
            device=self.options.device,
            threads=trial_threads(self.options.threads, spec.training.threads),
        )

    def _should_stop(self, study: optuna.Study) -> Callable[[], bool]:
        return self._should_stop_name(study.study_name)

    def _should_stop_name(self, study_name: str) -> Callable[[], bool]:
        last_check = -math.inf
        status = StudyStatus.RUNNING

        def should_stop() -> bool:
            nonlocal last_check, status
            if self.stopping:
                return True
            if time.monotonic() - last_check >= STATUS_CHECK_INTERVAL_S:
                status = self.store.study_status(study_name)
                last_check = time.monotonic()
            return status != StudyStatus.RUNNING

        return should_stop

    def _tell(
        self,
        study: optuna.Study,
        spec: StudySpec,
        trial: optuna.Trial,
        claim: Claim,
        result: TrialResult,
    ) -> None:
        self.store.write_record(self.store.trial_id(trial), _result_record(result))
        if result.status == TrialOutcome.CANCELLED:
            status = self.store.study_status(study.study_name)
            if status == StudyStatus.RUNNING:
                # Stopped by this worker's shutdown: the configuration is still wanted.
                self._fail(study, trial, claim, WORKER_STOPPED)
                self._retry(study, spec, self.store.get_trial(self.store.trial_id(trial)))
            else:
                self._fail(
                    study,
                    trial,
                    claim,
                    "cancelled" if status == StudyStatus.CANCELLED else f"study {status}",
                )
            return
        if result.status == TrialOutcome.PRUNED:
            # A pruned trial used its slot: the claim completes, the budget stays exact.
            if not self.store.finish_claim(claim, ClaimState.COMPLETE):
                self._fail(study, trial, claim, "its claim was freed as stale by another worker")
                return
            record = TrialAttributes(pruned_at_epoch=result.pruned_at_epoch)
            if self.store.prune(study, trial, record):
                logger.info(
                    "%s trial %d pruned after epoch %d",
                    study.study_name,
                    trial.number,
                    result.pruned_at_epoch,
                )
            if self.store.claim_counts(claim.study_name).complete >= spec.n_trials:
                self._set_status(claim.study_name, StudyStatus.COMPLETED)
            return
        if result.status != TrialOutcome.COMPLETED:
            self._fail(study, trial, claim, result.failure_reason or result.status)
            return
        needed = [item.key for item in (*spec.objectives, *spec.requirements)]
        missing = [key for key in needed if key not in result.metrics]
        if missing:
            self._fail(study, trial, claim, f"the trial reported no {missing}")
            return
        for requirement in spec.requirements:
            bound = (
                f">={requirement.min:g}"
                if requirement.min is not None
                else (f"<={requirement.max:g}")
            )
            value = result.metrics[requirement.key]
            self.store.set_constraint(
                trial, f"{requirement.key}{bound}", requirement.violation(value)
            )
        # The claim decides: a trial whose claim was freed as stale meanwhile does not count.
        if not self.store.finish_claim(claim, ClaimState.COMPLETE):
            self._fail(study, trial, claim, "its claim was freed as stale by another worker")
            return
        values = [result.metrics[objective.key] for objective in spec.objectives]
        if self.store.tell(study, trial, values):
            logger.info(
                "%s trial %d complete: %s",
                study.study_name,
                trial.number,
                ", ".join(
                    f"{objective.key}={value:.4g}"
                    for objective, value in zip(spec.objectives, values, strict=True)
                ),
            )
        else:
            logger.warning("trial %d was finished by another worker", trial.number)
        if self.store.claim_counts(claim.study_name).complete >= spec.n_trials:
            self._set_status(claim.study_name, StudyStatus.COMPLETED)

    def _fail(
        self,
        study: optuna.Study,
        trial: optuna.Trial,
        claim: Claim,
        reason: str,
        details: str | None = None,
    ) -> None:
        logger.info("%s trial %d failed: %s", study.study_name, trial.number, reason)
        self.store.finish_claim(claim, ClaimState.FAILED, reason)
        # False when another worker already failed it as stale.
        self.store.fail(
            study, trial, TrialAttributes(failure_reason=reason, failure_details=details)
        )

    # ------------------------------------------------------------------ dead workers

    def _reap(self, study_name: str, spec: StudySpec | None) -> None:
        """Fail the trials of dead workers and, with the ``spec`` of a running study, re-enqueue
        their parameters; at most once per heartbeat interval and study."""
        now = time.monotonic()
        if now - self._reaped_at.get(study_name, -math.inf) < self.options.heartbeat_interval:
            return
        self._reaped_at[study_name] = now
        stale = self.store.free_stale_claims(study_name, self.options.grace_period)
        study = self.store.load_study(study_name)
        for claim in stale:
            if claim.trial_id is not None:
                reason = f"worker {claim.worker_id} stopped heartbeating"
                self._fail_stale_trial(study, spec, claim.trial_id, reason)
        # A worker that died between Optuna's ask and recording the trial on its claim leaves a
        # RUNNING trial no claim knows; fail it once it has stayed so for a grace period.
        live = self.store.claimed_trial_ids(study_name)
        seen = self._orphans_seen.get(study_name, {})
        orphans = {
            trial_id: seen.get(trial_id, now)
            for trial_id in self.store.running_trial_ids(study)
            if trial_id not in live
        }
        for trial_id, first_seen in list(orphans.items()):
            if now - first_seen > self.options.grace_period:
                self._fail_stale_trial(study, spec, trial_id, "no worker holds it")
                del orphans[trial_id]
        self._orphans_seen[study_name] = orphans

    def _fail_stale_trial(
        self, study: optuna.Study, spec: StudySpec | None, trial_id: int, reason: str
    ) -> None:
        if not self.store.fail_trial_id(trial_id, TrialAttributes(failure_reason=reason)):
            return  # its worker finished it after all
        trial = self.store.get_trial(trial_id)
        logger.info("%s trial %d failed: %s", study.study_name, trial.number, reason)
        if spec is not None:
            self._retry(study, spec, trial)

    def _retry(self, study: optuna.Study, spec: StudySpec, trial: optuna.trial.FrozenTrial) -> None:
        retries = TrialAttributes.read(trial).retries
        params = trial_params(trial)
        if retries >= spec.max_retries or "loss" not in params:
            return
        retry = TrialAttributes(retry_of=trial.number, retries=retries + 1)
        self.store.enqueue(study, params, retry.user_attrs("retry_of", "retries"))

    def _set_status(self, study_name: str, status: StudyStatus, reason: str | None = None) -> None:
        self._networks.pop(study_name, None)  # a study extended later loads it again
        if self.store.study_status(study_name) != StudyStatus.RUNNING:
            return
        study = self.store.load_study(study_name)
        self.store.set_status(study, status, reason)
        if status == StudyStatus.COMPLETED:
            # Every slot is complete, so no claim is running: a RUNNING trial no claim knows
            # belongs to a worker that died between asking Optuna and recording the trial on its
            # claim. A trial on a complete claim is being told by its worker right now (the claim
            # completes first), so it is left alone.
            claimed = self.store.claimed_trial_ids(
                study_name, (ClaimState.RUNNING, ClaimState.COMPLETE)
            )
            for trial_id in self.store.running_trial_ids(study):
                if trial_id not in claimed:
                    self._fail_stale_trial(study, None, trial_id, "no worker holds it")


class _LeaseLost(Exception):
    """The training lease was freed as stale while the network trained."""


def _run_tags(study_id: str, number: int, params: dict[str, Any]) -> dict[str, str]:
    """The MLflow tags that tie a trial's run to its study."""
    return {
        "liptune.study_id": study_id,
        TRIAL_NUMBER_TAG: str(number),
        "liptune.loss_family": params["loss"],
    }


def _result_record(result: TrialResult) -> TrialAttributes:
    """The outcome fields of a trial's record."""
    return TrialAttributes(
        metrics=dict(result.metrics),
        epochs=list(result.epochs),
        radii=result.radii,
        certificate_mode=result.certificate_mode,
        mlflow_run_id=result.run_id,
        model_uri=result.model_uri,
        lipschitz_bound=result.metrics.get("lipschitz_bound"),
        lipschitz_estimate=result.metrics.get("lipschitz_estimate"),
        attack=result.attack,
    )


def run_worker(options: WorkerOptions) -> int:
    """Run a worker until SIGTERM/SIGINT (or its limits); returns the number of trials run.

    Call from the main thread: the signal handlers are installed for the worker's lifetime and
    the previous ones restored afterwards.
    """
    worker = Worker(options)

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("%s: stopping after the current trial", signal.Signals(signum).name)
        worker.stop()

    previous = {
        signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        return worker.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
