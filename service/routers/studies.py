"""``/studies``: submit, list, inspect, cancel and extend studies; fronts and recommendations."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi_pagination import Params, paginate
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import results, studies
from service.admission import check_study
from service.cache import StudySnapshot, UnknownStudy
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
from worker.spec import StudySpec
from worker.study import (
    StudyStatus,
    optuna_study_name,
    study_status,
)
from worker.trial.datasets import DatasetError, describe_dataset

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


def summary_view(snapshot: StudySnapshot) -> StudySummary:
    def compute() -> StudySummary:
        objectives = results.objective_entries(snapshot.spec)
        return StudySummary.model_validate(
            {
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
        )

    return snapshot.memo("summary", compute)


def _class_names(snapshot: StudySnapshot) -> list[str] | None:
    try:
        return list(describe_dataset(snapshot.spec.dataset).class_names)
    except DatasetError:
        return None


def detail_view(snapshot: StudySnapshot) -> StudyDetail:
    def compute() -> StudyDetail:
        objectives = results.objective_entries(snapshot.spec)
        eta = (
            results.eta_seconds(snapshot.records, snapshot.n_trials, datetime.now())
            if snapshot.status == StudyStatus.RUNNING
            else None
        )
        epochs = results.epoch_counts(snapshot.records, snapshot.spec.training.epochs)
        return StudyDetail.model_validate(
            {
                **summary_view(snapshot).model_dump(),
                "class_names": _class_names(snapshot),
                "spec": snapshot.spec_data,
                "objectives": objectives,
                "requirements": [r.model_dump(mode="json") for r in snapshot.spec.requirements],
                "hypervolume": results.hypervolume(snapshot.records, objectives),
                "eta_seconds": eta,
                "epochs": epochs,
                **results.conditioned_view(snapshot.spec, epochs["spent"], snapshot.conditioned),
            }
        )

    # The ETA moves with the clock: recomputed at each refresh (once per TTL at most).
    return snapshot.memo(("detail", snapshot.refreshed_at), compute)


def pareto_view(snapshot: StudySnapshot, eps: float | None) -> ParetoFront:
    def compute() -> ParetoFront:
        if eps is None:
            objectives = results.objective_entries(snapshot.spec)
            front = results.pareto_front(snapshot.records, objectives)
        else:
            objectives = results.eps_objectives(eps)
            front = results.pareto_front_at_eps(snapshot.records, snapshot.radii, eps)
        return ParetoFront.model_validate({"eps": eps, "objectives": objectives, "trials": front})

    return snapshot.memo(("pareto", eps), compute)


# --------------------------------------------------------------------------- writes


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
    submission = studies.submit(resources, spec, idempotency_key)
    headers = {"Location": f"/studies/{submission.study_id}"}
    if submission.replayed:
        headers["Idempotent-Replayed"] = "true"
        snapshot = studies.created_snapshot(resources.cache, submission.study_id)
    else:
        snapshot = load_snapshot(resources.cache, submission.study_id)
    return InfJSONResponse(detail_view(snapshot), status_code=201, headers=headers)


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
    studies.cancel(resources, snapshot)
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
    resources: Resources = Depends(get_resources),
) -> InfJSONResponse:
    studies.extend(resources, snapshot, request.n_trials)
    return InfJSONResponse(detail_view(load_snapshot(resources.cache, snapshot.id)))


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

    def summaries(page_ids: list[str]) -> list[StudySummary]:
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
        objectives = [objective.model_dump() for objective in front.objectives]
        chosen = results.knee(front.trials, objectives)
        if chosen is None:
            raise Problem(404, "empty-front", "no completed feasible trial yet: no knee")
        return InfJSONResponse(
            Recommendation(strategy="knee", eps=eps, objectives=front.objectives, trial=chosen)
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
        Recommendation.model_validate(
            {
                "strategy": "requirement",
                "eps": eps,
                "objectives": results.eps_objectives(eps),
                "trial": answer.trial,
            }
        )
    )
