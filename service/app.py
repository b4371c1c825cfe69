"""The FastAPI application: ``create_app(settings)``.

At start it migrates the service's tables (:func:`service.migrations.upgrade`, safe when several
processes start together), opens the Optuna storage on the same URL, and shares both, with the
study cache, through ``app.state.resources``. Background work (the cost model's warm-up) lives in
the app's lifespan: it starts when the app starts serving and is awaited when it shuts down.
Every response is JSON in which infinite floats are the strings ``"Infinity"``/``"-Infinity"``
(``alpha_kr = inf``), every error problem+json.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import sqlalchemy
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator
from sqlalchemy.orm import sessionmaker

from service import problems
from service.cache import StudyCache
from service.config import Settings
from service.dependencies import Resources, require_read_key
from service.migrations import upgrade
from service.routers import catalog, health, pages, studies, trials
from service.routers.health import StudyCollector, WorkerCollector
from service.schemas import InfJSONResponse
from service.schemas import Problem as ProblemSchema
from worker.common import engine_kwargs, install_log_redaction
from worker.study import StudyStore
from worker.trial import warm_up
from worker.trial.datasets import set_data_roots

DESCRIPTION = """
Explore the accuracy / certified-robustness trade-off of 1-Lipschitz networks: submit a study,
follow it, read its Pareto front at any eps, register and download the model you choose.

Errors are `application/problem+json` (RFC 9457) with `errors: [{field, reason, type}]` naming
the offending field. Infinite numbers (e.g. `alpha_kr`) are written `"Infinity"`.
"""


TAGS = [
    {
        "name": "studies",
        "description": "Submit, follow, cancel and extend studies; their Pareto "
        "fronts at any eps and recommendations.",
    },
    {
        "name": "trials",
        "description": "A study's trials: records, per-epoch logs, model "
        "downloads and registration in the MLflow model registry.",
    },
    {
        "name": "catalog",
        "description": "What a study spec may name: data sets, models, losses, samplers, defaults.",
    },
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics."},
]


def _operation_id(route: APIRoute) -> str:
    """Readable operation ids: the route function's name (``get_study``, ``list_trials``)."""
    return route.name


def open_resources(settings: Settings) -> Resources:
    """Migrate the service's tables and open the stores ``settings`` name."""
    store = StudyStore(settings.resolved_storage_url())  # first: SQLite files switch to WAL
    url = store.url
    upgrade(url)
    engine = sqlalchemy.create_engine(url, **engine_kwargs(url))
    sessions = sessionmaker(engine, expire_on_commit=False)
    return Resources(
        settings=settings,
        engine=engine,
        sessions=sessions,
        store=store,
        cache=StudyCache(store, sessions, settings.cache_ttl_s),
        tracking_uri=settings.resolved_mlflow_uri(),
    )


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    """Start the background work when the app starts serving and await it at shutdown.

    The cost model's warm-up traces models with torch, which cannot be interrupted, and a process
    that exits while it runs aborts in torch's C++ (exit status 134): so shutdown joins it, and the
    thread is not a daemon, so that an exit which skips shutdown still waits for it.
    """
    warming = threading.Thread(target=warm_up, name="cost-warm-up")
    warming.start()
    try:
        yield
    finally:
        await asyncio.to_thread(warming.join)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The liptune API on the stores of ``settings`` (default: from the environment)."""
    settings = settings or Settings()
    set_data_roots(settings.resolved_data_roots())
    install_log_redaction()
    resources = open_resources(settings)
    app = FastAPI(
        title="liptune",
        version=importlib.metadata.version("liptune"),
        description=DESCRIPTION,
        default_response_class=InfJSONResponse,
        openapi_tags=TAGS,
        generate_unique_id_function=_operation_id,
        lifespan=lifespan,
        responses={
            "4XX": {
                "model": ProblemSchema,
                "content": {problems.PROBLEM_MEDIA_TYPE: {}},
                "description": "Problem details (RFC 9457)",
            }
        },
    )
    app.state.resources = resources
    problems.install(app, settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Authorization", "X-API-Key", "Idempotency-Key"],
        )
    # The pages first: their routes match only browser navigations (Accept: text/html).
    for router in (pages.router, studies.router, trials.router, catalog.router, health.router):
        app.include_router(router)
    registry = CollectorRegistry()
    registry.register(StudyCollector(resources.store))
    registry.register(WorkerCollector(app))
    Instrumentator(registry=registry, excluded_handlers=["/metrics"]).instrument(app).expose(
        app,
        endpoint="/metrics",
        include_in_schema=True,
        tags=["health"],
        dependencies=[Depends(require_read_key)],
    )
    return app
