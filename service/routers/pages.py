"""The web pages, their figures and their static files.

``GET /studies/{id}`` and ``GET /studies/{id}/trials/{number}`` are both a web page and a JSON
endpoint. The pages use :class:`HTMLPageRoute`, which matches only requests that prefer
``text/html`` (what a browser sends when it navigates), so API clients fall through to the JSON
routes: include :data:`router` *before* the API routers.

The figure endpoints answer Plotly figure JSON (``{"data", "layout"}``) built by
:mod:`dashboards.figures` and :mod:`service.study_figures` from the study snapshot the JSON
API answers from (:mod:`service.cache`: the same records, radii and fronts), memoised per
snapshot; the pages draw them with ``Plotly.react``:

- ``GET /studies/{id}/figures/pareto[?eps=][&min_accuracy=][&min_certified_accuracy=]
  [&requirement_eps=]``: every completed trial, the front highlighted (the front of ``GET
  /studies/{id}/pareto`` with the same ``eps``), the trials meeting the requirements ringed and
  the recommended one starred; ``layout.meta`` holds ``front``, ``meeting`` and
  ``recommendation``;
- ``.../figures/certified-accuracy[?eps=][&marker=]``: certified accuracy against eps of the
  front's trials;
- ``.../figures/hypervolume``, ``.../figures/importance``,
  ``.../figures/parallel-coordinates[?objective=KEY]``: Optuna's figures;
- ``GET /studies/{id}/trials/{number}/figures/training-curves``, ``.../figures/radii`` and
  ``.../figures/attack`` (certified radius against adversarial distance, the diagonal drawn).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import optuna
import plotly.graph_objects as go
from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from optuna.trial import FrozenTrial, TrialState
from starlette.routing import Match, Mount
from starlette.types import Scope

from dashboards import figures
from dashboards.pages import PLOTLY_JS, STATIC_DIR, render
from service import study_figures
from service.cache import StudyCache, StudySnapshot, UnknownStudy
from service.config import Settings
from service.dependencies import (
    get_cache,
    get_settings,
    reads_protected,
    require_read_key,
    study_snapshot,
)
from service.problems import Problem
from service.results import (
    candidates,
    default_eps,
    eps_objectives,
    objective_entries,
    pareto_front,
    recommend_for,
    record_at_eps,
    reference_point,
)
from service.schemas import TrialRecord
from worker.common import without_credentials
from worker.spec import metric_key
from worker.study import TrialAttributes, optuna_study_name
from worker.trial import RadiiSummary

#: Points of a certified-accuracy curve.
CURVE_POINTS = 200
#: Quantile of the radii where the curves' eps axis ends (the largest radii are outliers).
CURVE_RADIUS_QUANTILE = 0.995


def prefers_html(scope: Scope) -> bool:
    """Whether the request's ``Accept`` header asks for ``text/html`` at least as much as for
    JSON (``q`` values compared; a browser's navigation does, ``fetch`` and API clients don't)."""
    accept = ""
    for name, value in scope.get("headers", ()):
        if name == b"accept":
            accept = value.decode("latin-1")
            break
    weights: dict[str, float] = {}
    for part in accept.split(","):
        media_type, *parameters = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            if key.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        weights[media_type.lower()] = max(quality, weights.get(media_type.lower(), 0.0))
    html = weights.get("text/html", 0.0)
    return html > 0.0 and html >= weights.get("application/json", 0.0)


class HTMLPageRoute(APIRoute):
    """A route that matches only requests preferring HTML, so that a JSON route with the same
    path answers everyone else."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match == Match.NONE or not prefers_html(scope):
            return Match.NONE, {}
        return match, child_scope


router = APIRouter(include_in_schema=False)
_pages = APIRouter(route_class=HTMLPageRoute, include_in_schema=False)
_figures = APIRouter(include_in_schema=False, dependencies=[Depends(require_read_key)])

CacheDependency = Annotated[StudyCache, Depends(get_cache)]
SettingsDependency = Annotated[Settings, Depends(get_settings)]
SnapshotDependency = Annotated[StudySnapshot, Depends(study_snapshot)]


# --------------------------------------------------------------------------- pages


@router.get("/", response_class=HTMLResponse)
def studies_page() -> HTMLResponse:
    """The studies, and the form to submit one."""
    return HTMLResponse(render("studies.html", title="Studies"))


@_pages.get("/studies", response_class=HTMLResponse)
def studies_page_alias() -> HTMLResponse:
    """A browser that opens ``/studies`` gets the studies page too."""
    return studies_page()


@_pages.get("/studies/{study_id}", response_class=HTMLResponse)
def study_page(study_id: str, cache: CacheDependency, settings: SettingsDependency) -> HTMLResponse:
    """The trade-off of one study (its data comes from the JSON API and the figures).

    With ``protect_reads`` a page is the same shell for every id: a browser navigation carries
    no key, so the page may not even say whether the study exists (its API calls do, with one).
    """
    if not reads_protected(settings) and _known(cache, study_id) is None:
        return _not_found(f"There is no study {study_id!r}.")
    return HTMLResponse(render("study.html", title="Study", study_id=study_id))


@_pages.get("/studies/{study_id}/trials/{number}", response_class=HTMLResponse)
def trial_page(
    study_id: str, number: int, cache: CacheDependency, settings: SettingsDependency
) -> HTMLResponse:
    """One trial: curves, radii, hyper-parameters, its MLflow run and model (with
    ``protect_reads``, the same shell for every id and number, as :func:`study_page`)."""
    if not reads_protected(settings):
        snapshot = _known(cache, study_id)
        if snapshot is None:
            return _not_found(f"There is no study {study_id!r}.")
        if number not in snapshot.trials:
            return _not_found(f"The study has no trial #{number}.", study_id=study_id)
    return HTMLResponse(
        render(
            "trial.html",
            title=f"Trial #{number}",
            study_id=study_id,
            number=number,
            mlflow_ui_url=mlflow_ui_url(settings),
        )
    )


def mlflow_ui_url(settings: Settings) -> str | None:
    """The MLflow web UI when tracking goes to an MLflow server (``http(s)://``), else ``None``
    (a local SQLite store has no UI to link to; the page shows the run id)."""
    uri = without_credentials(settings.resolved_mlflow_uri())
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def _known(cache: StudyCache, study_id: str) -> StudySnapshot | None:
    try:
        return cache.snapshot(study_id)
    except UnknownStudy:
        return None


def _not_found(message: str, study_id: str | None = None) -> HTMLResponse:
    return HTMLResponse(
        render("error.html", title="Not found", message=message, study_id=study_id),
        status_code=404,
    )


@router.get("/static/plotly.min.js")
def plotly_js() -> FileResponse:
    """plotly.js from the installed ``plotly`` package: the pages need no network."""
    return FileResponse(
        PLOTLY_JS, media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"}
    )


# --------------------------------------------------------------------------- helpers


def _plane(
    snapshot: StudySnapshot, eps: float | None
) -> tuple[list[TrialRecord], list[TrialRecord], str, str]:
    """(records placed in the plane, the front, x key, y key): with ``eps`` the front in
    (accuracy, certified accuracy at eps) from the radii, without it the study objectives' front
    (the same as ``GET /studies/{id}/pareto[?eps=]``)."""
    if eps is not None:
        placed = [record_at_eps(r, snapshot.radii.get(r.number), eps) for r in snapshot.records]
        objectives = eps_objectives(eps)
        return placed, pareto_front(placed, objectives), objectives[0]["key"], objectives[1]["key"]
    objectives = objective_entries(snapshot.spec)
    front = pareto_front(snapshot.records, objectives)
    keys = [o["key"] for o in objectives]
    if len(keys) == 1:  # one objective: draw it against the other side of the trade-off
        keys.append(
            "accuracy"
            if keys[0] != "accuracy"
            else metric_key("certified_accuracy", default_eps(snapshot.spec))
        )
    return snapshot.records, front, keys[0], keys[1]


def _optuna_study(snapshot: StudySnapshot) -> optuna.Study:
    """The snapshot's trials as an in-memory Optuna study, for Optuna's own figures (numbers,
    states, values and constraints kept; no second read of the storage)."""

    def build() -> optuna.Study:
        study = optuna.create_study(
            study_name=optuna_study_name(snapshot.id),
            directions=[o.direction for o in snapshot.spec.objectives],
        )
        study.add_trials(snapshot.trials[number] for number in sorted(snapshot.trials))
        return study

    return snapshot.memo(("pages", "optuna-study"), build)


# --------------------------------------------------------------------------- study figures

Fraction = Annotated[float | None, Query(ge=0.0, le=1.0)]
PositiveEps = Annotated[float | None, Query(gt=0.0, le=100.0)]


@dataclass(frozen=True)
class FigureQuery:
    """The query parameters of the study figures (each figure reads the ones it needs)."""

    eps: float | None = None
    min_accuracy: float | None = None
    min_certified_accuracy: float | None = None
    requirement_eps: float | None = None
    marker: float | None = None
    objective: str | None = None


def pareto(snapshot: StudySnapshot, query: FigureQuery) -> go.Figure:
    """Every completed trial, the front highlighted, the requirement filters applied."""
    placed, front, x_key, y_key = _plane(snapshot, query.eps)
    objective_values = {r.number: r.values or {} for r in snapshot.records}
    points = [
        figures.TrialPoint(
            number=record.number,
            family=str(record.params.get("loss")),
            x=x,
            y=y,
            params=record.params,
            values={**objective_values[record.number], **record.values},
            feasible=record.feasible,
        )
        for record in placed
        if record.state == "COMPLETE"
        and record.values is not None
        and (x := record.value(x_key)) is not None
        and (y := record.value(y_key)) is not None
    ]
    pruned = [
        figures.TrialPoint(
            number=record.number,
            family=str(record.params.get("loss")),
            x=reached[x_key],
            y=reached[y_key],
            params=record.params,
            values={x_key: reached[x_key], y_key: reached[y_key]},
            pruned_at_epoch=record.pruned_at_epoch,
        )
        for record in snapshot.records
        if record.state == "PRUNED"
        and (reached := record.values_reached or {}).keys() >= {x_key, y_key}
    ]
    meeting, recommendation = _requirements(snapshot, query)
    figure = figures.pareto_figure(
        points,
        [r.number for r in front],
        x_key=x_key,
        y_key=y_key,
        meeting=meeting,
        recommended=recommendation["trial"] if recommendation else None,
        pruned=pruned,
    )
    meta = dict(figure.layout.meta or {"front": [], "meeting": []})
    meta.update(eps=query.eps, x_key=x_key, y_key=y_key, recommendation=recommendation)
    figure.update_layout(meta=meta)
    return figure


def _requirements(
    snapshot: StudySnapshot, query: FigureQuery
) -> tuple[list[int], dict[str, Any] | None]:
    """The trials meeting the query's minimums (certified accuracy at ``requirement_eps``,
    default the page's eps, then the study's) and the recommendation of
    :func:`service.results.recommend`: the best accuracy among them when certified accuracy is
    required, else the best certified accuracy."""
    requirement_eps = query.requirement_eps or query.eps or default_eps(snapshot.spec)
    if query.min_accuracy is None and query.min_certified_accuracy is None:
        return [], None
    asked = recommend_for(
        snapshot.records,
        snapshot.radii,
        requirement_eps,
        min_accuracy=query.min_accuracy,
        min_certified_accuracy=query.min_certified_accuracy,
    )
    minimums, maximize, answer = asked.minimums, asked.maximize, asked.recommendation
    meeting = [
        r.number
        for r in candidates(asked.records)
        if all((v := r.value(k)) is not None and v >= m for k, m in minimums.items())
    ]
    return meeting, {
        "trial": answer.trial.number if answer.trial else None,
        "maximize": maximize,
        "minimums": minimums,
        "closest": answer.closest.number if answer.closest else None,
        "shortfall": answer.shortfall,
        "best_achieved": answer.best_achieved,
    }


def certified_accuracy_curves(snapshot: StudySnapshot, query: FigureQuery) -> go.Figure:
    """Certified accuracy against eps of the front's trials, from their radii."""
    _, front, _, _ = _plane(snapshot, query.eps)
    with_radii = [
        (record, radii)
        for record in front
        if (radii := snapshot.radii.get(record.number)) is not None and radii.n > 0
    ]
    marker = query.marker or query.eps or default_eps(snapshot.spec)
    upper = max([marker * 1.5, *snapshot.spec.report_eps()])
    for _, radii in with_radii:
        if radii.radii.size:
            upper = max(upper, float(np.quantile(radii.radii, CURVE_RADIUS_QUANTILE)))
    grid = np.linspace(0.0, upper, CURVE_POINTS)
    curves = [
        figures.AccuracyCurve(
            number=record.number,
            family=str(record.params.get("loss")),
            eps=grid.tolist(),
            certified_accuracy=radii.certified_accuracy(grid).tolist(),
        )
        for record, radii in with_radii
    ]
    return figures.certified_accuracy_curves_figure(curves, eps=marker)


def hypervolume(snapshot: StudySnapshot, query: FigureQuery) -> go.Figure:
    """Optuna's hypervolume history, with the reference point of ``GET /studies/{id}``."""
    reference = reference_point(snapshot.records, objective_entries(snapshot.spec))
    if reference is None:
        return figures.empty_figure("No completed trial yet.", title="Hypervolume")
    return study_figures.hypervolume_history_figure(_optuna_study(snapshot), reference)


def importance(snapshot: StudySnapshot, query: FigureQuery) -> go.Figure:
    """Optuna's parameter importances, per objective."""
    keys = [o.key for o in snapshot.spec.objectives]
    return study_figures.param_importances_figure(_optuna_study(snapshot), keys)


def parallel_coordinates(snapshot: StudySnapshot, query: FigureQuery) -> go.Figure:
    """Optuna's parallel coordinates, coloured by ``query.objective`` (default the first)."""
    keys = [o.key for o in snapshot.spec.objectives]
    key = query.objective or keys[0]
    if key not in keys:
        raise Problem(
            422,
            "invalid-input",
            f"query.objective: {key!r} is not an objective of this study; one of {keys}",
            errors=[{"field": "query.objective", "reason": f"one of {keys}", "type": "enum"}],
        )
    return study_figures.parallel_coordinate_figure(_optuna_study(snapshot), keys.index(key), key)


STUDY_FIGURES: Mapping[str, Callable[[StudySnapshot, FigureQuery], go.Figure]] = {
    "pareto": pareto,
    "certified-accuracy": certified_accuracy_curves,
    "hypervolume": hypervolume,
    "importance": importance,
    "parallel-coordinates": parallel_coordinates,
}


@_figures.get("/studies/{study_id}/figures/{name}")
def study_figure(
    name: str,
    snapshot: SnapshotDependency,
    eps: Annotated[float | None, Query(gt=0.0, le=100.0, description="Front at this eps.")] = None,
    min_accuracy: Fraction = None,
    min_certified_accuracy: Fraction = None,
    requirement_eps: PositiveEps = None,
    marker: PositiveEps = None,
    objective: str | None = None,
) -> dict[str, Any]:
    """A figure of the study page as Plotly JSON; ``name`` is one of :data:`STUDY_FIGURES`."""
    if name not in STUDY_FIGURES:
        raise Problem(
            404, "unknown-figure", f"no study figure {name!r}; one of {sorted(STUDY_FIGURES)}"
        )
    query = FigureQuery(
        eps, min_accuracy, min_certified_accuracy, requirement_eps, marker, objective
    )
    return snapshot.memo(
        ("pages", "figure", name, query),
        lambda: json.loads(STUDY_FIGURES[name](snapshot, query).to_json()),
    )


# --------------------------------------------------------------------------- trial figures


def training_curves(trial: FrozenTrial, snapshot: StudySnapshot) -> go.Figure:
    """The per-epoch log of the trial (its record's ``epochs``)."""
    epochs = TrialAttributes.read(trial).epochs
    if not epochs and trial.state == TrialState.COMPLETE:
        return figures.empty_figure("This trial recorded no per-epoch log.")
    if not epochs and trial.state.is_finished():
        return figures.empty_figure(
            f"This trial ended ({trial.state.name}) before its first epoch."
        )
    return figures.training_curves_figure(epochs)


def radii_histogram(trial: FrozenTrial, snapshot: StudySnapshot) -> go.Figure:
    """The trial's certificate radii, the study's reporting eps marked."""
    radii: RadiiSummary | None = snapshot.radii.get(trial.number)
    if radii is None:
        return figures.empty_figure(
            "This trial stored no certificate radii."
            if trial.state == TrialState.COMPLETE
            else f"The radii appear when the trial completes (it is {trial.state.name})."
        )
    return figures.radii_histogram_figure(radii.radii, radii.n, eps=snapshot.spec.report_eps())


def attack_check(trial: FrozenTrial, snapshot: StudySnapshot) -> go.Figure:
    """Certified radius against adversarial distance of the points the trial's attack check
    attacked (the record's ``attack``)."""
    attack = TrialAttributes.read(trial, "attack").attack
    if attack is None or not attack.pairs:
        return figures.empty_figure(
            "This trial stored no per-point attack check."
            if trial.state == TrialState.COMPLETE
            else f"The attack check runs when the trial completes (it is {trial.state.name})."
        )
    return figures.certificate_tightness_figure(attack.pairs, tightness=attack.summary())


TRIAL_FIGURES: Mapping[str, Callable[[FrozenTrial, StudySnapshot], go.Figure]] = {
    "training-curves": training_curves,
    "radii": radii_histogram,
    "attack": attack_check,
}


@_figures.get("/studies/{study_id}/trials/{number}/figures/{name}")
def trial_figure(number: int, name: str, snapshot: SnapshotDependency) -> dict[str, Any]:
    """A figure of the trial page as Plotly JSON; ``name`` is one of :data:`TRIAL_FIGURES`."""
    if name not in TRIAL_FIGURES:
        raise Problem(
            404, "unknown-figure", f"no trial figure {name!r}; one of {sorted(TRIAL_FIGURES)}"
        )
    trial = snapshot.trials.get(number)
    if trial is None:
        raise Problem(
            404,
            "unknown-trial",
            f"study {snapshot.id} has no trial {number} (it has {len(snapshot.trials)} trials, "
            "numbered from 0)",
        )
    return json.loads(TRIAL_FIGURES[name](trial, snapshot).to_json())


router.include_router(_pages)
router.include_router(_figures)
router.routes.append(Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"))
