"""``/studies``: submit, list, inspect, cancel and extend studies; fronts and recommendations."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi_pagination import Params, paginate
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import results
from service.admission import check_study
from service.cache import StudyCache, StudySnapshot, UnknownStudy
from service.db import StudyRow
from service.dependencies import (
    Resources,
    get_db,
    get_resources,
    load_snapshot,
    require_read_key,
    require_write_key,
    study_snapshot,
)
from service.http import conditional_json, paged_json
from service.problems import Problem, field_error, invalid_input
from service.schemas import (
    ExtendRequest,
    InfJSONResponse,
    Page,
    ParetoFront,
    Recommendation,
    StudyDetail,
    StudyStatusName,
    StudySummary,
    render_json,
)
from worker.datasets import DatasetError, describe_dataset
from worker.spec import StudySpec
from worker.studies import (
    SPEC_ATTR,
    StudyStatus,
    cancel_study,
    create_study,
    load_study,
    optuna_study_name,
    set_status,
    study_status,
)

router = APIRouter(tags=["studies"])
reads = [Depends(require_read_key)]
writes = [Depends(require_write_key)]

Eps = Annotated[
    float | None,
    Query(
        gt=0.0,
        le=100.0,
        description="Recompute the front in (accuracy, certified accuracy "
        "at eps) from the stored radii.",
    ),
]


# --------------------------------------------------------------------------- views


def _urls(study_id: str) -> dict[str, str]:
    base = f"/studies/{study_id}"
    return {
        "self": base,
        "trials": f"{base}/trials",
        "pareto": f"{base}/pareto",
        "dashboard": base,
    }


def _utc(moment: datetime) -> datetime:
    """SQLite returns naive datetimes: the service writes them in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def summary_view(snapshot: StudySnapshot) -> dict[str, Any]:
    def compute() -> dict[str, Any]:
        objectives = results.objective_entries(snapshot.spec)
        return {
            "id": snapshot.id,
            "name": snapshot.name,
            "dataset": snapshot.spec.dataset.name,
            "model": snapshot.spec.model.name,
            "status": snapshot.status,
            "n_trials": snapshot.n_trials,
            "counts": results.state_counts(snapshot.records),
            "best": results.best_so_far(snapshot.records, objectives),
            "created_at": _utc(snapshot.created_at).isoformat(),
            "urls": _urls(snapshot.id),
        }

    return snapshot.memo("summary", compute)


def _class_names(snapshot: StudySnapshot) -> list[str] | None:
    try:
        return list(describe_dataset(snapshot.spec.dataset).class_names)
    except DatasetError:
        return None


def detail_view(snapshot: StudySnapshot) -> dict[str, Any]:
    def compute() -> dict[str, Any]:
        objectives = results.objective_entries(snapshot.spec)
        eta = (
            results.eta_seconds(snapshot.records, snapshot.n_trials, datetime.now())
            if snapshot.status == StudyStatus.RUNNING
            else None
        )
        return {
            **summary_view(snapshot),
            "class_names": _class_names(snapshot),
            "spec": snapshot.spec_data,
            "objectives": objectives,
            "requirements": [r.model_dump(mode="json") for r in snapshot.spec.requirements],
            "hypervolume": results.hypervolume(snapshot.records, objectives),
            "eta_seconds": eta,
            "epochs": results.epoch_counts(snapshot.records, snapshot.spec.training.epochs),
            **results.conditioned_view(snapshot.spec, snapshot.records, snapshot.conditioned),
        }

    # The ETA moves with the clock: recomputed at each refresh (once per TTL at most).
    return snapshot.memo(("detail", snapshot.refreshed_at), compute)


def pareto_view(snapshot: StudySnapshot, eps: float | None) -> dict[str, Any]:
    def compute() -> dict[str, Any]:
        if eps is None:
            objectives = results.objective_entries(snapshot.spec)
            front = results.pareto_front(snapshot.records, objectives)
        else:
            objectives = results.eps_objectives(eps)
            front = results.pareto_front_at_eps(snapshot.records, snapshot.radii, eps)
        return {"eps": eps, "objectives": objectives, "trials": front}

    return snapshot.memo(("pareto", eps), compute)


# --------------------------------------------------------------------------- writes


def _replay(row: StudyRow, request_hash: str, cache: StudyCache) -> InfJSONResponse:
    if row.request_hash != request_hash:
        raise Problem(
            422,
            "idempotency-key-reused",
            "this Idempotency-Key was used for a different request body; use a new key for a "
            "new study",
            errors=[field_error("header.Idempotency-Key", "already used for another body")],
        )
    return InfJSONResponse(
        detail_view(_created_snapshot(cache, row.id)),
        status_code=201,
        headers={"Location": f"/studies/{row.id}", "Idempotent-Replayed": "true"},
    )


#: How long a replayed submission waits for the first request to create the Optuna study.
REPLAY_WAIT_S = 30.0


def _created_snapshot(cache: StudyCache, study_id: str) -> StudySnapshot:
    """The snapshot of a study whose row exists, waiting while the request that inserted it is
    still creating its Optuna study (a 404 only if that request gave up and removed the row)."""
    deadline = time.monotonic() + REPLAY_WAIT_S
    while True:
        try:
            return cache.snapshot(study_id)
        except UnknownStudy:
            if time.monotonic() > deadline:
                raise Problem(
                    503,
                    "study-being-created",
                    "the first request with this Idempotency-Key is still creating the study",
                    headers={"Retry-After": "5"},
                ) from None
            time.sleep(0.05)


@router.post(
    "/studies",
    status_code=201,
    response_model=StudyDetail,
    dependencies=writes,
    summary="Submit a study",
    responses={201: {"description": "Created (or replayed for a repeated Idempotency-Key)"}},
)
def submit_study(
    spec: Annotated[StudySpec, Body()],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="Repeat a request safely: the same key and body give the same study.",
        ),
    ] = None,
    resources: Resources = Depends(get_resources),
) -> InfJSONResponse:
    check_study(spec, resources.settings)
    spec_json = spec.model_dump_json()
    request_hash = hashlib.sha256(spec_json.encode()).hexdigest()
    if idempotency_key is not None:
        existing = _recorded(resources, idempotency_key)
        if existing is not None:  # a retry: answered from the record, no write
            return _replay(existing, request_hash, resources.cache)
    study_id = uuid.uuid4().hex
    row = StudyRow(
        id=study_id,
        name=spec.name,
        spec=json.loads(spec_json),
        n_trials=spec.n_trials,
        created_at=datetime.now(UTC),
        idempotency_key=idempotency_key,
        request_hash=request_hash if idempotency_key is not None else None,
    )
    winner = _insert(resources, row)
    if winner is not None:  # the same key, submitted concurrently, won the race
        return _replay(winner, request_hash, resources.cache)
    try:
        create_study(resources.storage, spec, study_id)
    except ValueError as error:
        _forget(resources, study_id)
        raise invalid_input([field_error("body.sampler", str(error))]) from None
    except BaseException:
        _forget(resources, study_id)
        raise
    return InfJSONResponse(
        detail_view(load_snapshot(resources.cache, study_id)),
        status_code=201,
        headers={"Location": f"/studies/{study_id}"},
    )


#: One writer of submission rows per process: SQLite has one writer anyway, and a submission
#: waiting for the write lock waits here, holding no pooled connection.
_INSERT_LOCK = threading.Lock()


def _recorded(resources: Resources, idempotency_key: str) -> StudyRow | None:
    """The study row recorded under ``idempotency_key``: one read, the connection returned to
    the pool before anything waits."""
    with resources.sessions() as db:
        return db.scalars(
            select(StudyRow).where(StudyRow.idempotency_key == idempotency_key)
        ).one_or_none()


def _insert(resources: Resources, row: StudyRow) -> StudyRow | None:
    """Store ``row``; ``None``, or the row of a concurrent submission that recorded the same
    idempotency key first. A connection is checked out only once this request may write."""
    with _INSERT_LOCK:
        if row.idempotency_key is not None:
            existing = _recorded(resources, row.idempotency_key)
            if existing is not None:
                return existing
        with resources.sessions() as db:
            db.add(row)
            try:
                db.commit()
            except IntegrityError:  # another API process recorded the key first
                db.rollback()
            else:
                return None
    assert row.idempotency_key is not None
    existing = _recorded(resources, row.idempotency_key)
    if existing is None:  # the other request recorded the key, then failed and forgot it
        raise Problem(
            503,
            "study-being-created",
            "another request with this Idempotency-Key was creating the study and gave up; "
            "retry after the delay in Retry-After",
            headers={"Retry-After": "1"},
        )
    return existing


def _json_spec(spec: StudySpec) -> dict[str, Any]:
    """The spec as JSON data, with inf written ``"Infinity"`` as in Optuna's user attributes."""
    return json.loads(spec.model_dump_json())


def _forget(resources: Resources, study_id: str) -> None:
    with resources.sessions() as db:
        row = db.get(StudyRow, study_id)
        if row is not None:
            db.delete(row)
            db.commit()


@router.post(
    "/studies/{study_id}/cancel",
    response_model=StudyDetail,
    dependencies=writes,
    summary="Cancel a running study",
)
def cancel(
    snapshot: StudySnapshot = Depends(study_snapshot),
    resources: Resources = Depends(get_resources),
) -> InfJSONResponse:
    if snapshot.status != StudyStatus.RUNNING:
        raise Problem(409, "study-not-running", f"the study is {snapshot.status}, not running")
    cancel_study(resources.storage, snapshot.id)
    resources.cache.invalidate(snapshot.id)
    return InfJSONResponse(detail_view(load_snapshot(resources.cache, snapshot.id)))


@router.post(
    "/studies/{study_id}/extend",
    response_model=StudyDetail,
    dependencies=writes,
    summary="Add trials to a study (also a finished one: it runs again)",
)
def extend(
    request: ExtendRequest,
    snapshot: StudySnapshot = Depends(study_snapshot),
    db: Session = Depends(get_db),
    resources: Resources = Depends(get_resources),
) -> InfJSONResponse:
    limit = resources.settings.max_trials
    # The increment is one UPDATE (atomic on SQLite and PostgreSQL); the Optuna spec is then
    # set, not added to, from the row's total until both agree, so concurrent extends all count.
    total = db.execute(
        update(StudyRow)
        .where(StudyRow.id == snapshot.id, StudyRow.n_trials + request.n_trials <= limit)
        .values(n_trials=StudyRow.n_trials + request.n_trials)
        .returning(StudyRow.n_trials)
    ).scalar_one_or_none()
    db.commit()
    if total is None:
        raise invalid_input(
            [
                field_error(
                    "body.n_trials",
                    f"{snapshot.n_trials} + {request.n_trials} trials exceed this server's "
                    f"limit of {limit}",
                    "limit",
                )
            ]
        )
    while True:
        spec = _set_budget(resources, snapshot.id, total)
        current = db.scalars(select(StudyRow.n_trials).where(StudyRow.id == snapshot.id)).one()
        if current == total:
            break
        total = current
    db.execute(
        update(StudyRow)
        .where(StudyRow.id == snapshot.id, StudyRow.n_trials == total)
        .values(spec=_json_spec(spec))
    )
    db.commit()
    resources.cache.invalidate(snapshot.id)
    return InfJSONResponse(detail_view(load_snapshot(resources.cache, snapshot.id)))


def _set_budget(resources: Resources, study_id: str, n_trials: int) -> StudySpec:
    """Set the Optuna study's budget to ``n_trials`` and open it to workers again."""
    study = load_study(resources.storage, study_id)
    data = study.user_attrs[SPEC_ATTR]
    spec = StudySpec.model_validate({**data, "n_trials": n_trials})
    study.set_user_attr(SPEC_ATTR, _json_spec(spec))
    set_status(study, StudyStatus.RUNNING)
    return spec


# --------------------------------------------------------------------------- reads


@router.get(
    "/studies", response_model=Page[StudySummary], dependencies=reads, summary="List studies"
)
def list_studies(
    request: Request,
    status: Annotated[
        StudyStatusName | None, Query(description="Only studies in this status.")
    ] = None,
    params: Params = Depends(),
    db: Session = Depends(get_db),
    resources: Resources = Depends(get_resources),
) -> Response:
    rows = db.execute(select(StudyRow.id).order_by(StudyRow.created_at.desc(), StudyRow.id)).all()
    ids = [row.id for row in rows]
    if status is not None:
        statuses = {
            study.study_name: study_status(study) for study in resources.store.liptune_studies()
        }
        ids = [i for i in ids if statuses.get(optuna_study_name(i)) == status]

    def summaries(page_ids: list[str]) -> list[dict[str, Any]]:
        views = []
        for study_id in page_ids:
            try:
                views.append(summary_view(resources.cache.snapshot(study_id)))
            except UnknownStudy:  # its Optuna study is being created or was deleted
                continue
        return views

    return paged_json(request, paginate(ids, params, transformer=summaries, safe=True).model_dump())


@router.get(
    "/studies/{study_id}",
    response_model=StudyDetail,
    dependencies=reads,
    summary="A study: spec, status, counts, best values, hypervolume, ETA",
)
async def get_study(
    request: Request, snapshot: StudySnapshot = Depends(study_snapshot)
) -> Response:
    body = snapshot.memo(
        ("detail.json", snapshot.refreshed_at), lambda: render_json(detail_view(snapshot))
    )
    return conditional_json(request, body)


@router.get(
    "/studies/{study_id}/pareto",
    response_model=ParetoFront,
    dependencies=reads,
    summary="The non-dominated feasible completed trials",
)
async def get_pareto(
    request: Request, eps: Eps = None, snapshot: StudySnapshot = Depends(study_snapshot)
) -> Response:
    body = snapshot.memo(("pareto.json", eps), lambda: render_json(pareto_view(snapshot, eps)))
    return conditional_json(request, body)


@router.get(
    "/studies/{study_id}/recommend",
    response_model=Recommendation,
    dependencies=reads,
    summary="The best trial meeting a requirement, or the knee of the front",
    responses={404: {"description": "No trial meets the requirement (says how close)."}},
)
def recommend(
    strategy: Annotated[
        Literal["requirement", "knee"],
        Query(description="`requirement`: the best trial meeting the minimums; `knee`."),
    ] = "requirement",
    eps: Eps = None,
    min_certified_accuracy: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    min_accuracy: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    snapshot: StudySnapshot = Depends(study_snapshot),
) -> InfJSONResponse:
    if strategy == "knee":
        front = pareto_view(snapshot, eps)
        chosen = results.knee(front["trials"], front["objectives"])
        if chosen is None:
            raise Problem(404, "empty-front", "no completed feasible trial yet: no knee")
        return InfJSONResponse(
            {"strategy": "knee", "eps": eps, "objectives": front["objectives"], "trial": chosen}
        )
    if min_certified_accuracy is None and min_accuracy is None:
        raise invalid_input(
            [
                field_error(
                    "query.min_certified_accuracy",
                    "give min_certified_accuracy and/or min_accuracy (or strategy=knee)",
                    "missing",
                )
            ]
        )
    eps = results.default_eps(snapshot.spec) if eps is None else eps
    asked = results.recommend_for(
        snapshot.records,
        snapshot.radii,
        eps,
        min_accuracy=min_accuracy,
        min_certified_accuracy=min_certified_accuracy,
    )
    answer, minimums = asked.recommendation, asked.minimums
    if answer.trial is None:
        wanted = ", ".join(f"{key} >= {value:g}" for key, value in minimums.items())
        reached = ", ".join(f"{key} = {value:.4g}" for key, value in answer.best_achieved.items())
        detail = f"no completed feasible trial has {wanted}"
        detail += f"; the best reached {reached}" if reached else "; no trial has completed yet"
        raise Problem(
            404,
            "requirement-not-met",
            detail,
            best_achieved=answer.best_achieved,
            closest=answer.closest,
            shortfall=answer.shortfall,
        )
    return InfJSONResponse(
        {
            "strategy": "requirement",
            "eps": eps,
            "objectives": results.eps_objectives(eps),
            "trial": answer.trial,
        }
    )
