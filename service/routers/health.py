"""``/health`` (the process answers), ``/ready`` (database and MLflow reachable), ``/metrics``.

``/metrics`` is Prometheus' text format: request counts and latencies from
prometheus-fastapi-instrumentator, and liptune's gauges, computed at each scrape by
:class:`StudyCollector`: studies by status, trials by state, the queue depth (trials still to
start in running studies) and the age of each running trial's last heartbeat.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import datetime

import optuna
from fastapi import APIRouter, Depends
from mlflow import MlflowClient
from optuna.storages._rdb.models import TrialModel
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, inspect, select, text

from service.dependencies import Resources, get_resources
from service.problems import Problem
from service.results import TRIAL_STATES
from worker.claims import RUNNING as CLAIM_RUNNING
from worker.claims import claims
from worker.studies import ID_ATTR, RUNNING, SPEC_ATTR, STATUS_ATTR, STATUSES, STUDY_PREFIX

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness: the process answers")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="Readiness: the database and MLflow answer",
    responses={503: {"description": "A store is unreachable (the problem says which)."}},
)
def ready(resources: Resources = Depends(get_resources)) -> dict[str, object]:
    checks = {}
    try:
        with resources.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as error:
        raise Problem(503, "not-ready", f"the database is unreachable: {error}") from None
    try:
        MlflowClient(resources.tracking_uri).search_experiments(max_results=1)
        checks["mlflow"] = "ok"
    except Exception as error:
        raise Problem(503, "not-ready", f"MLflow is unreachable: {error}") from None
    return {"status": "ready", "checks": checks}


class StudyCollector(Collector):
    """liptune's gauges, read from the Optuna storage at each scrape."""

    def __init__(self, storage: optuna.storages.RDBStorage) -> None:
        self.storage = storage

    def collect(self) -> Iterator[GaugeMetricFamily]:
        studies = [
            study
            for study in self.storage.get_all_studies()
            if study.study_name.startswith(STUDY_PREFIX) and ID_ATTR in study.user_attrs
        ]
        by_status = Counter(study.user_attrs.get(STATUS_ATTR, RUNNING) for study in studies)
        status_gauge = GaugeMetricFamily(
            "liptune_studies", "liptune studies by status", labels=["status"]
        )
        for status in STATUSES:
            status_gauge.add_metric([status], by_status.get(status, 0))
        yield status_gauge

        study_ids = {study._study_id: study for study in studies}
        with self.storage.scoped_session() as session:
            rows = session.execute(
                select(TrialModel.study_id, TrialModel.state, func.count())
                .where(TrialModel.study_id.in_(study_ids))
                .group_by(TrialModel.study_id, TrialModel.state)
            ).all()
        trial_gauge = GaugeMetricFamily(
            "liptune_trials", "trials of liptune studies by state", labels=["state"]
        )
        by_state = Counter()
        complete_by_study = Counter()
        active_by_study = Counter()
        for study_id, state, count in rows:
            by_state[state.name] += count
            if state.name == "COMPLETE":
                complete_by_study[study_id] += count
            if state.name in ("RUNNING", "WAITING"):
                active_by_study[study_id] += count
        for state in TRIAL_STATES:
            trial_gauge.add_metric([state], by_state.get(state, 0))
        yield trial_gauge

        queue = 0
        for study_id, study in study_ids.items():
            if study.user_attrs.get(STATUS_ATTR) != RUNNING:
                continue
            n_trials = study.user_attrs.get(SPEC_ATTR, {}).get("n_trials", 0)
            queue += max(0, n_trials - complete_by_study[study_id] - active_by_study[study_id])
        yield GaugeMetricFamily(
            "liptune_queue_depth", "trials still to start in running studies", value=queue
        )

        age_gauge = GaugeMetricFamily(
            "liptune_worker_heartbeat_age_seconds",
            "seconds since each worker with a running trial last heartbeated",
            labels=["worker"],
        )
        for worker_id, age in self._heartbeat_ages():
            age_gauge.add_metric([worker_id], age)
        yield age_gauge

    def _heartbeat_ages(self) -> list[tuple[str, float]]:
        engine = self.storage.engine
        if not inspect(engine).has_table(claims.name):  # no worker has run yet
            return []
        with engine.connect() as connection:
            now = _as_datetime(connection.execute(select(func.now())).scalar_one())
            rows = connection.execute(
                select(claims.c.worker_id, func.max(claims.c.heartbeat_at))
                .where(claims.c.state == CLAIM_RUNNING)
                .group_by(claims.c.worker_id)
            ).all()
        return [
            (worker_id, max(0.0, (now - _as_datetime(beat)).total_seconds()))
            for worker_id, beat in rows
        ]


def _as_datetime(value: datetime | str) -> datetime:
    """A database time as a naive datetime in the database's clock (SQLite returns text)."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=None)
