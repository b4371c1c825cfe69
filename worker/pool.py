"""The worker loop: run trials of every running study, oldest study first, until stopped.

One worker runs one trial at a time:

1. for each running study (:func:`worker.studies.running_studies`), oldest first, it fails the
   trials of dead workers (no heartbeat for the grace period) and re-enqueues their parameters,
   then claims a slot of the study's budget (:mod:`worker.claims`);
2. with a slot, it asks Optuna (the study's sampler rebuilt from the spec, seeded for this
   worker), suggests the loss parameters (:mod:`worker.search_space`), and runs the trial
   (:func:`worker.trial.run_trial`) while a thread heartbeats the claim and the Optuna trial;
3. it tells Optuna the objective values (in the order of ``spec.objectives``) with the
   requirements as constraints, or FAIL with ``liptune.failure_reason``.

Trial user attributes: ``liptune.metrics``, ``liptune.epochs``, ``liptune.radii``,
``liptune.mlflow_run_id``, ``liptune.model_uri``, ``liptune.certificate_mode``,
``liptune.worker``, ``liptune.params`` (every loss parameter), and for failures
``liptune.failure_reason``; a retried trial has ``liptune.retry_of`` (the failed trial's number)
and ``liptune.retries``.

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
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from worker import claims
from worker.claims import Claim
from worker.samplers import build_sampler, worker_seed
from worker.search_space import enqueue, suggest_params, trial_params
from worker.spec import StudySpec
from worker.storage import (
    DEFAULT_GRACE_PERIOD_S,
    DEFAULT_HEARTBEAT_INTERVAL_S,
    open_storage,
    transaction_engine,
)
from worker.studies import (
    CANCELLED,
    COMPLETED,
    FAILED,
    RUNNING,
    STATUS_ATTR,
    load_spec,
    running_studies,
    set_status,
)
from worker.tracking import TrackingConfig
from worker.trial import TrialResult, run_trial

logger = logging.getLogger("liptune.worker")

WORKER_ATTR = "liptune.worker"
FAILURE_REASON_ATTR = "liptune.failure_reason"
RETRY_OF_ATTR = "liptune.retry_of"
RETRIES_ATTR = "liptune.retries"
EPOCHS_ATTR = "liptune.epochs"

WORKER_STOPPED = "worker stopped"
#: Seconds between two reads of a study's status by a running trial.
STATUS_CHECK_INTERVAL_S = 1.0
#: A study ends as failed after more than max(n_trials, this) failed trials.
MIN_FAILURE_BUDGET = 5


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


class Heartbeat:
    """A thread that marks a claim (and, once attached, its Optuna trial) alive every
    ``interval`` seconds until stopped."""

    def __init__(
        self,
        engine: Any,
        storage: optuna.storages.RDBStorage,
        claim: Claim,
        interval: float,
    ) -> None:
        self._engine = engine
        self._storage = storage
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
        self._storage.record_heartbeat(trial_id)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                if not claims.heartbeat(self._engine, self._claim):
                    self.lost = True
                if self._trial_id is not None:
                    self._storage.record_heartbeat(self._trial_id)
            except Exception:  # a transient database error must not kill the heartbeat
                logger.exception("heartbeat of claim %s failed", self._claim.claim_id)


class Worker:
    """Runs trials of every running study until :meth:`stop` (or its trial limit)."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.storage = open_storage(
            options.storage_url,
            heartbeat_interval=options.heartbeat_interval,
            grace_period=options.grace_period,
        )
        self.engine = transaction_engine(options.storage_url)
        claims.ensure_table(self.engine)
        self.trials_run = 0
        self._stopping = threading.Event()
        self._samplers: dict[str, optuna.samplers.BaseSampler] = {}
        self._reaped_at: dict[str, float] = {}
        # study name -> {trial id: when first seen RUNNING without a live claim (monotonic)}
        self._orphans_seen: dict[str, dict[int, float]] = {}

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
        running = running_studies(self.storage)
        # Dead workers' trials of stopped (e.g. cancelled) studies must not stay RUNNING either.
        running_names = {frozen.study_name for _, frozen in running}
        for name in claims.studies_with_running_claims(self.engine) - running_names:
            self._reap(name, spec=None)
        for study_id, frozen in running:
            if self.stopping:
                return False
            spec = load_spec(frozen)
            name = frozen.study_name
            self._reap(name, spec)
            counts = claims.counts(self.engine, name)
            if counts.failed > failure_budget(spec):
                self._set_status(
                    name,
                    FAILED,
                    f"{counts.failed} trials failed, more than the study allows "
                    f"({failure_budget(spec)}); see the trials' liptune.failure_reason",
                )
                continue
            claim = claims.claim_slot(
                self.engine, name, n_trials=spec.n_trials, worker_id=self.options.worker_id
            )
            if claim is None:
                if counts.complete >= spec.n_trials:
                    self._set_status(name, COMPLETED)
                continue
            self._run_claim(study_id, spec, claim)
            self.trials_run += 1
            return True
        return False

    # ------------------------------------------------------------------ one trial

    def _sampler(self, study_name: str, spec: StudySpec) -> optuna.samplers.BaseSampler:
        if study_name not in self._samplers:
            seed = worker_seed(spec.seed, f"{self.options.worker_id}/{os.getpid()}")
            self._samplers[study_name] = build_sampler(spec, seed)
        return self._samplers[study_name]

    def _run_claim(self, study_id: str, spec: StudySpec, claim: Claim) -> None:
        study = optuna.load_study(
            study_name=claim.study_name,
            storage=self.storage,
            sampler=self._sampler(claim.study_name, spec),
        )
        with Heartbeat(self.engine, self.storage, claim, self.options.heartbeat_interval) as beat:
            try:
                with warnings.catch_warnings():
                    # Optuna's heartbeat thread runs only in optimize(); Heartbeat does its work.
                    warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                    trial = study.ask()
            except Exception as error:  # the slot is freed; the failure budget bounds retries
                logger.exception("asking %s for a trial failed", claim.study_name)
                claims.finish(self.engine, claim, claims.FAILED, f"ask failed: {error!r}")
                return
            # Optuna's storage API names trials by id; the public Trial exposes only its number.
            trial_id = trial._trial_id
            claims.record_trial(self.engine, claim, trial_id=trial_id, trial_number=trial.number)
            beat.attach(trial_id)
            trial.set_user_attr(WORKER_ATTR, self.options.worker_id)
            try:
                result = self._train(study, study_id, spec, trial)
            except Exception as error:
                logger.exception("trial %d of %s crashed", trial.number, claim.study_name)
                reason = f"{type(error).__name__}: {error}"
                self._fail(study, trial, claim, reason, traceback.format_exc(limit=5))
                return
            if beat.lost:
                self._fail(study, trial, claim, "its claim was freed as stale by another worker")
                return
            self._tell(study, spec, trial, claim, result)

    def _train(
        self, study: optuna.Study, study_id: str, spec: StudySpec, trial: optuna.Trial
    ) -> TrialResult:
        params = suggest_params(trial, spec.search_space)
        trial_spec = spec.trial_spec(params, seed=(spec.seed + trial.number) % 2**31)
        epochs: list[dict[str, Any]] = []

        def on_epoch(record: dict[str, Any]) -> None:
            epochs.append(record)
            trial.set_user_attr(EPOCHS_ATTR, epochs)

        logger.info("%s trial %d: %s", study.study_name, trial.number, params)
        return run_trial(
            trial_spec,
            tracking=self.options.tracking,
            experiment=f"liptune/{spec.name}/{study_id}",
            tags={
                "liptune.study_id": study_id,
                "liptune.trial_number": str(trial.number),
                "liptune.loss_family": params["loss"],
            },
            should_stop=self._should_stop(study),
            on_epoch=on_epoch,
            data_roots=self.options.data_roots,
            device=self.options.device,
            threads=self.options.threads,
        )

    def _should_stop(self, study: optuna.Study) -> Callable[[], bool]:
        last_check = -math.inf
        status = RUNNING

        def should_stop() -> bool:
            nonlocal last_check, status
            if self.stopping:
                return True
            if time.monotonic() - last_check >= STATUS_CHECK_INTERVAL_S:
                status = study.user_attrs.get(STATUS_ATTR, RUNNING)
                last_check = time.monotonic()
            return status != RUNNING

        return should_stop

    def _tell(
        self,
        study: optuna.Study,
        spec: StudySpec,
        trial: optuna.Trial,
        claim: Claim,
        result: TrialResult,
    ) -> None:
        for key, value in _result_attrs(result).items():
            trial.set_user_attr(key, value)
        if result.status == "cancelled":
            status = study.user_attrs.get(STATUS_ATTR, RUNNING)
            if status == RUNNING:
                # Stopped by this worker's shutdown: the configuration is still wanted.
                self._fail(study, trial, claim, WORKER_STOPPED)
                self._retry(study, spec, self.storage.get_trial(trial._trial_id))
            else:
                self._fail(
                    study, trial, claim, CANCELLED if status == CANCELLED else f"study {status}"
                )
            return
        if result.status != "completed":
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
            trial.set_constraint(f"{requirement.key}{bound}", requirement.violation(value))
        # The claim decides: a trial whose claim was freed as stale meanwhile does not count.
        if not claims.finish(self.engine, claim, claims.COMPLETE):
            self._fail(study, trial, claim, "its claim was freed as stale by another worker")
            return
        values = [result.metrics[objective.key] for objective in spec.objectives]
        try:
            study.tell(trial, values)
        except UpdateFinishedTrialError:
            logger.warning("trial %d was finished by another worker", trial.number)
        if claims.counts(self.engine, claim.study_name).complete >= spec.n_trials:
            self._set_status(claim.study_name, COMPLETED)

    def _fail(
        self,
        study: optuna.Study,
        trial: optuna.Trial,
        claim: Claim,
        reason: str,
        details: str | None = None,
    ) -> None:
        logger.info("%s trial %d failed: %s", study.study_name, trial.number, reason)
        claims.finish(self.engine, claim, claims.FAILED, reason)
        try:
            trial.set_user_attr(FAILURE_REASON_ATTR, reason)
            if details is not None:
                trial.set_user_attr("liptune.failure_details", details)
            study.tell(trial, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            pass  # already failed as stale by another worker

    # ------------------------------------------------------------------ dead workers

    def _reap(self, study_name: str, spec: StudySpec | None) -> None:
        """Fail the trials of dead workers and, with the ``spec`` of a running study, re-enqueue
        their parameters; at most once per heartbeat interval and study."""
        now = time.monotonic()
        if now - self._reaped_at.get(study_name, -math.inf) < self.options.heartbeat_interval:
            return
        self._reaped_at[study_name] = now
        stale = claims.free_stale_claims(self.engine, study_name, self.options.grace_period)
        study = optuna.load_study(study_name=study_name, storage=self.storage)
        for claim in stale:
            if claim.trial_id is not None:
                reason = f"worker {claim.worker_id} stopped heartbeating"
                self._fail_stale_trial(study, spec, claim.trial_id, reason)
        # A worker that died between Optuna's ask and recording the trial on its claim leaves a
        # RUNNING trial no claim knows; fail it once it has stayed so for a grace period.
        live = claims.live_trial_ids(self.engine, study_name)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        seen = self._orphans_seen.get(study_name, {})
        orphans = {
            trial._trial_id: seen.get(trial._trial_id, now)
            for trial in running
            if trial._trial_id not in live
        }
        for trial_id, first_seen in list(orphans.items()):
            if now - first_seen > self.options.grace_period:
                self._fail_stale_trial(study, spec, trial_id, "no worker holds it")
                del orphans[trial_id]
        self._orphans_seen[study_name] = orphans

    def _fail_stale_trial(
        self, study: optuna.Study, spec: StudySpec | None, trial_id: int, reason: str
    ) -> None:
        trial = self.storage.get_trial(trial_id)
        if trial.state != TrialState.RUNNING:
            return
        try:
            self.storage.set_trial_user_attr(trial_id, FAILURE_REASON_ATTR, reason)
            if not self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                return
        except UpdateFinishedTrialError:
            return  # its worker finished it after all
        logger.info("%s trial %d failed: %s", study.study_name, trial.number, reason)
        if spec is not None:
            self._retry(study, spec, trial)

    def _retry(self, study: optuna.Study, spec: StudySpec, trial: optuna.trial.FrozenTrial) -> None:
        retries = int(trial.user_attrs.get(RETRIES_ATTR, 0))
        params = trial_params(trial)
        if retries >= spec.max_retries or "loss" not in params:
            return
        enqueue(study, params, {RETRY_OF_ATTR: trial.number, RETRIES_ATTR: retries + 1})

    def _set_status(self, study_name: str, status: str, reason: str | None = None) -> None:
        study = optuna.load_study(study_name=study_name, storage=self.storage)
        if study.user_attrs.get(STATUS_ATTR) != RUNNING:
            return
        set_status(study, status, reason)
        if status == COMPLETED:
            # Every slot is complete, so no claim is running: a RUNNING trial left now belongs
            # to a worker that died between asking Optuna and recording the trial on its claim.
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                self._fail_stale_trial(study, None, trial._trial_id, "no worker holds it")


def _result_attrs(result: TrialResult) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "liptune.metrics": dict(result.metrics),
        EPOCHS_ATTR: list(result.epochs),
        "liptune.certificate_mode": result.certificate_mode,
    }
    if result.radii is not None:
        attrs["liptune.radii"] = result.radii.encode()
    if result.run_id is not None:
        attrs["liptune.mlflow_run_id"] = result.run_id
    if result.model_uri is not None:
        attrs["liptune.model_uri"] = result.model_uri
    return attrs


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
