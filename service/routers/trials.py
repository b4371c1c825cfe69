"""``/studies/{id}/trials``: the trials of a study, registering and downloading their models."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import mlflow.artifacts
import mlflow.pytorch
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse
from fastapi_pagination import Params, paginate
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from starlette.background import BackgroundTask

from service.cache import StudySnapshot
from service.dependencies import (
    Resources,
    get_resources,
    require_read_key,
    require_write_key,
    study_snapshot,
)
from service.http import conditional_json, paged_json
from service.problems import Problem, field_error, invalid_input
from service.schemas import (
    AttackResult,
    Page,
    Registered,
    RegisterRequest,
    TrialDetail,
    TrialRecord,
    TrialStateName,
    render_json,
)
from worker.search import trial_params
from worker.study import TrialAttributes
from worker.tracking import ONNX_ARTIFACT, register_model, using_tracking_uri
from worker.trial import attack_check

router = APIRouter(tags=["trials"])
reads = [Depends(require_read_key)]
writes = [Depends(require_write_key)]

#: File of the pickled model inside an ``mlflow.pytorch`` logged model.
PT_FILE = "data/model.pth"
#: Artifact of the trial's MLflow run that an on-demand attack check is logged to.
ATTACK_ARTIFACT = "attack_check.json"


def _record(snapshot: StudySnapshot, number: int) -> TrialRecord:
    for record in snapshot.records:
        if record.number == number:
            return record
    raise Problem(
        404,
        "unknown-trial",
        f"study {snapshot.id} has no trial {number} (it has "
        f"{len(snapshot.records)} trials, numbered from 0)",
    )


def _completed_with_model(snapshot: StudySnapshot, number: int) -> TrialRecord:
    record = _record(snapshot, number)
    if record.state != "COMPLETE":
        raise Problem(
            409,
            "trial-not-complete",
            f"trial {number} is {record.state}: only a COMPLETE trial has a model",
        )
    if not record.model_uri or not record.mlflow_run_id:
        raise Problem(409, "trial-without-model", f"trial {number} logged no model to MLflow")
    return record


@router.get(
    "/studies/{study_id}/trials",
    response_model=Page[TrialRecord],
    dependencies=reads,
    summary="The trials of a study, by number",
)
def list_trials(
    request: Request,
    state: Annotated[TrialStateName | None, Query(description="Only trials in this state.")] = None,
    params: Params = Depends(),
    snapshot: StudySnapshot = Depends(study_snapshot),
) -> Response:
    records = snapshot.records
    if state is not None:
        records = [record for record in records if record.state == state]
    return paged_json(request, paginate(records, params, safe=True).model_dump())


@router.get(
    "/studies/{study_id}/trials/{number}",
    response_model=TrialDetail,
    dependencies=reads,
    summary="One trial, with its per-epoch log",
)
def get_trial(
    request: Request, number: int, snapshot: StudySnapshot = Depends(study_snapshot)
) -> Response:
    record = _record(snapshot, number)
    stored = TrialAttributes.read(snapshot.trials[number])
    detail = {
        **record.model_dump(),
        "epochs": stored.epochs,
        "attack_pairs": [list(pair) for pair in stored.attack.pairs] if stored.attack else [],
        "certificate_mode": stored.certificate_mode,
        "worker": stored.worker,
    }
    return conditional_json(request, render_json(detail))


@router.post(
    "/studies/{study_id}/trials/{number}/register",
    response_model=Registered,
    status_code=201,
    dependencies=writes,
    summary="Register the trial's model in the MLflow model registry",
)
def register(
    number: int,
    request: RegisterRequest,
    snapshot: StudySnapshot = Depends(study_snapshot),
    resources: Resources = Depends(get_resources),
) -> dict[str, Any]:
    record = _completed_with_model(snapshot, number)
    try:
        uri = register_model(
            resources.tracking_uri, record.model_uri, request.name, request.aliases
        )
    except MlflowException as error:
        raise invalid_input([field_error("body.name", error.message)]) from None
    return {"model_uri": uri, "name": request.name, "aliases": request.aliases, "trial": number}


@router.post(
    "/studies/{study_id}/trials/{number}/attack",
    response_model=AttackResult,
    dependencies=writes,
    summary="Attack the certificates of a completed trial's logged model (logged to its run)",
)
def attack(
    number: int,
    snapshot: StudySnapshot = Depends(study_snapshot),
    resources: Resources = Depends(get_resources),
) -> Response:
    """Loads the trial's PyTorch model from MLflow, recomputes its certificates from the
    guaranteed head bound on the study's test split, runs the minimal-norm L2 attack on the
    same seeded correctly classified test points as a worker does, and logs the result to the
    trial's MLflow run as ``attack_check.json``. The trial record keeps the worker's check:
    Optuna refuses writes to a finished trial."""
    record = _completed_with_model(snapshot, number)
    trial = snapshot.trials[number]
    mode = TrialAttributes.read(trial, "certificate_mode").certificate_mode
    if mode is None:
        raise Problem(409, "trial-without-model", f"trial {number} recorded no certificate mode")
    spec = snapshot.spec.trial_spec(trial_params(trial), seed=snapshot.spec.evaluation_seed(number))
    try:
        with using_tracking_uri(resources.tracking_uri):
            model = mlflow.pytorch.load_model(record.model_uri, map_location="cpu")
    except (MlflowException, OSError) as error:
        raise Problem(
            502, "artifact-unavailable", f"MLflow could not give the trial's model: {error}"
        ) from None
    summary = attack_check(
        model,
        spec,
        mode,
        data_roots=resources.settings.resolved_data_roots(),
    )
    body = {**summary.summary(), "pairs": [list(pair) for pair in summary.pairs]}
    try:
        MlflowClient(resources.tracking_uri).log_dict(record.mlflow_run_id, body, ATTACK_ARTIFACT)
    except MlflowException as error:
        raise Problem(
            502, "artifact-unavailable", f"MLflow could not store the attack check: {error}"
        ) from None
    body["trial"] = number
    return Response(render_json(body), media_type="application/json")


@router.get(
    "/studies/{study_id}/trials/{number}/model",
    dependencies=reads,
    summary="Download the trial's model: ONNX, or the pickled PyTorch module",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_model(
    number: int,
    format: Annotated[Literal["onnx", "pt"], Query(description="`onnx` or `pt`.")] = "onnx",
    snapshot: StudySnapshot = Depends(study_snapshot),
    resources: Resources = Depends(get_resources),
) -> FileResponse:
    record = _completed_with_model(snapshot, number)
    folder = Path(tempfile.mkdtemp(prefix="liptune-model-"))
    try:
        if format == "onnx":
            path = mlflow.artifacts.download_artifacts(
                run_id=record.mlflow_run_id,
                artifact_path=ONNX_ARTIFACT,
                dst_path=str(folder),
                tracking_uri=resources.tracking_uri,
            )
        else:
            model_id = record.model_uri.removeprefix("models:/")
            location = MlflowClient(resources.tracking_uri).get_logged_model(model_id)
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{location.artifact_location}/{PT_FILE}",
                dst_path=str(folder),
                tracking_uri=resources.tracking_uri,
            )
    except (MlflowException, OSError) as error:
        shutil.rmtree(folder, ignore_errors=True)
        raise Problem(
            502, "artifact-unavailable", f"MLflow could not give the {format} model: {error}"
        ) from None
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{snapshot.name}-trial{number}.{format}",
        background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True),
    )
