"""``/health`` (the process answers), ``/ready`` (database and MLflow reachable within a few
seconds, embedded workers running), ``/metrics``.

``/metrics`` is Prometheus' text format: request counts and latencies from
prometheus-fastapi-instrumentator, and liptune's gauges, computed at each scrape by
:class:`StudyCollector`: studies by status, trials by state, the queue depth (trials still to
start in running studies) and the age of each running trial's last heartbeat.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from mlflow import MlflowClient
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import text

from service.dependencies import Resources, get_resources
from service.problems import Problem
from service.schemas import TRIAL_STATES, Health
from worker.study import STATUSES, StudyStatus, StudyStore, load_spec, study_status

router = APIRouter(tags=["health"])
logger = logging.getLogger("liptune.service")


@router.get("/health", response_model=Health, summary="Liveness: the process answers")
def health() -> dict[str, str]:
    return {"status": "ok"}


#: Seconds /ready waits for each store.
READY_TIMEOUT_S = 3.0


def _mlflow_answers(tracking_uri: str) -> None:
    """Raise unless MLflow answers within :data:`READY_TIMEOUT_S` (a server's ``/health``;
    a local store by listing one experiment)."""
    if tracking_uri.startswith(("http://", "https://")):
        response = httpx.get(tracking_uri.rstrip("/") + "/health", timeout=READY_TIMEOUT_S)
        response.raise_for_status()
    else:
        MlflowClient(tracking_uri).search_experiments(max_results=1)


def _probe(checks: dict[str, str], name: str, what: str, probe: Callable[[], None]) -> None:
    """Run ``probe``; ``checks[name] = "ok"``, or 503 ``not-ready`` saying ``what`` is
    unreachable (the error's type only: its message may quote a URL)."""
    try:
        probe()
    except Exception as error:
        logger.warning("/ready: %s is unreachable: %s", what, error)
        raise Problem(
            503,
            "not-ready",
            f"{what} is unreachable ({type(error).__name__})",
            headers={"Retry-After": "5"},
        ) from None
    checks[name] = "ok"


@router.get(
    "/ready",
    summary="Readiness: the database and MLflow answer, the embedded workers run",
    responses={503: {"description": "A store is unreachable or no worker runs (says which)."}},
)
def ready(request: Request, resources: Resources = Depends(get_resources)) -> dict[str, object]:
    checks: dict[str, object] = {}

    def connect() -> None:
        with resources.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    _probe(checks, "database", "the database", connect)
    if resources.tracking_uri.lower() != "none":
        _probe(checks, "mlflow", "MLflow", lambda: _mlflow_answers(resources.tracking_uri))
    supervisor = getattr(request.app.state, "supervisor", None)
    if supervisor is not None and supervisor.slots:
        report = supervisor.report()
        checks["workers"] = report
        if report["running"] == 0:
            raise Problem(
                503,
                "not-ready",
                f"no embedded worker runs ({report['restarting']} restarting)",
                headers={"Retry-After": "5"},
                checks=checks,
            )
    return {"status": "ready", "checks": checks}


class WorkerCollector(Collector):
    """The embedded workers of ``liptune serve``, by state, and their restarts."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        supervisor = getattr(self.app.state, "supervisor", None)
        report = supervisor.report() if supervisor is not None else {"workers": []}
        states = GaugeMetricFamily(
            "liptune_embedded_workers", "embedded workers by state", labels=["state"]
        )
        for state in ("running", "restarting"):
            states.add_metric([state], sum(w["state"] == state for w in report["workers"]))
        yield states
        restarts = CounterMetricFamily(
            "liptune_embedded_worker_restarts",
            "restarts of each embedded worker",
            labels=["worker"],
        )
        for worker in report["workers"]:
            restarts.add_metric([str(worker["index"])], worker["restarts"])
        yield restarts


class StudyCollector(Collector):
    """liptune's gauges, read from the study store at each scrape."""

    def __init__(self, store: StudyStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        studies = self.store.liptune_studies()
        by_status = Counter(study_status(study) for study in studies)
        status_gauge = GaugeMetricFamily(
            "liptune_studies", "liptune studies by status", labels=["status"]
        )
        for status in STATUSES:
            status_gauge.add_metric([status], by_status.get(status, 0))
        yield status_gauge

        study_ids = {self.store.frozen_study_id(study): study for study in studies}
        rows = self.store.trial_state_counts(study_ids)
        trial_gauge = GaugeMetricFamily(
            "liptune_trials", "trials of liptune studies by state", labels=["state"]
        )
        by_state = Counter()
        complete_by_study = Counter()
        active_by_study = Counter()
        for study_id, state, count in rows:
            by_state[state] += count
            if state == "COMPLETE":
                complete_by_study[study_id] += count
            if state in ("RUNNING", "WAITING"):
                active_by_study[study_id] += count
        for state in TRIAL_STATES:
            trial_gauge.add_metric([state], by_state.get(state, 0))
        yield trial_gauge

        queue = 0
        for study_id, study in study_ids.items():
            if study_status(study) != StudyStatus.RUNNING:
                continue
            n_trials = load_spec(study).n_trials
            queue += max(0, n_trials - complete_by_study[study_id] - active_by_study[study_id])
        yield GaugeMetricFamily(
            "liptune_queue_depth", "trials still to start in running studies", value=queue
        )

        age_gauge = GaugeMetricFamily(
            "liptune_worker_heartbeat_age_seconds",
            "seconds since each worker with a running trial last heartbeated",
            labels=["worker"],
        )
        for worker_id, age in self.store.heartbeat_ages():
            age_gauge.add_metric([worker_id], age)
        yield age_gauge
