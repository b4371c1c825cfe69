"""MLflow: one experiment per study, one run per trial, the exported model and its certificates.

Every call goes through an :class:`mlflow.MlflowClient` bound to the configured tracking URI, so
threads of one process never share a fluent "active run". ``mlflow.pytorch.log_model`` reads
the process-wide tracking URI: it runs with that URI set for the duration of the call
(:func:`using_tracking_uri`).

A trial's models are MLflow logged models created in the trial's run and the study's
experiment, so their files live under the experiment's artifact location (the configured
artifact root), both with a signature and an input example:

- ``name="model"``, the one the registry points to: the pickled network in
  ``mlflow.pytorch``'s format (``mlflow.pytorch.load_model`` gives the raw network) whose
  ``python_function`` flavor is :mod:`liptune.serving` (``mlflow.pyfunc.load_model`` and
  ``mlflow models serve`` answer each input with its label, certified radius and logits, and
  with ``params={"eps": E}`` whether it is certified at E), with the trial's
  :class:`~liptune.serving.Certificate` beside the network and liptune's core as
  ``code_paths`` (:func:`model_code_paths`), so it loads where liptune is not installed;
- ``name="onnx"``, a ``mlflow.onnx`` model with the outputs ``output`` (logits) and ``radius``
  that ``mlflow models serve`` runs with onnxruntime.

Speed: the model is pickled (``torch.export``'s pt2 format takes seconds), its pip requirements
are stated (inferring them starts a subprocess) and system metrics are off.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.util
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Before mlflow is imported: no usage telemetry, no system metrics sampling thread.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

import mlflow
import mlflow.onnx
import mlflow.pyfunc
import mlflow.pytorch
import onnx
import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature, infer_signature
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
from sqlalchemy.engine import make_url

import liptune
from liptune.serving import LOADER_MODULE, Certificate
from worker.common._databases import resolve_url, schema_lock
from worker.common._paths import default_artifact_root, default_tracking_uri
from worker.common._retry import RetryPolicy

logger = logging.getLogger(__name__)

for _name in ("mlflow", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)

#: The run tag that holds why a run FAILED.
FAILURE_TAG = "liptune.failure_reason"
#: The run tag that holds the number of the Optuna trial the run records.
TRIAL_NUMBER_TAG = "liptune.trial_number"
#: The run tag that holds the logged model's URI (``models:/m-...``).
MODEL_URI_TAG = "liptune.model_uri"
MODEL_NAME = "model"
ONNX_MODEL_NAME = "onnx"
ONNX_ARTIFACT = "model.onnx"
RADII_ARTIFACT = "certificates/radii.npz"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
#: The core's source, shipped with each PyTorch model: the pickled modules are its classes.
_CORE_PATH = str(Path(liptune.__file__).resolve().parent)
#: Packages whose classes a pickled model may use without shipping them: the model's own
#: requirements.
_REQUIRED_PACKAGES = {"torch", "numpy", "builtins", "collections"}


_tracking_uri_lock = threading.RLock()


@contextlib.contextmanager
def using_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``tracking_uri`` for the block, one block at a
    time in the process.

    Private: MLflow's ``_use_tracking_uri``. Fluent calls (``mlflow.pytorch.log_model``,
    ``models:/`` sources) resolve the process-wide URI and MLflow has no public scoped form;
    ``mlflow.set_tracking_uri`` would leak into every other thread.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _tracking_uri_lock, _use_tracking_uri(tracking_uri):
        yield


def model_code_paths(model: nn.Module) -> list[str]:
    """The source that travels with a logged PyTorch ``model`` (its ``code_paths``): liptune's
    core (unpickling the network and answering it as a pyfunc, :mod:`liptune.serving`) and the
    top-level package of any other class in it (a model plugin's module), so the logged model
    loads where neither liptune nor the plugin is installed."""
    paths = [_CORE_PATH]
    for module in model.modules():
        package = type(module).__module__.split(".")[0]
        if package in _REQUIRED_PACKAGES or package == "liptune":
            continue
        origin = importlib.util.find_spec(package)
        if origin is None or not origin.submodule_search_locations:
            location = origin.origin if origin is not None else None
        else:
            location = next(iter(origin.submodule_search_locations))
        if location is not None and str(Path(location).resolve()) not in paths:
            paths.append(str(Path(location).resolve()))
    return paths


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs go: an MLflow tracking URI and, for a local store, the artifact folder.

    ``artifact_root`` is used as the artifact location of the experiments this module creates;
    ``None`` leaves it to the tracking server (``mlflow server --artifacts-destination``).
    """

    tracking_uri: str
    artifact_root: Path | None = None

    def __post_init__(self) -> None:
        # A bare postgresql:// URI works for MLflow as it does for the study store.
        object.__setattr__(self, "tracking_uri", resolve_url(self.tracking_uri))

    @classmethod
    def for_home(cls, home: Path) -> TrackingConfig:
        """The embedded default: ``sqlite:///HOME/mlflow.db`` with artifacts in
        ``HOME/mlartifacts``."""
        return cls(default_tracking_uri(home), default_artifact_root(home))

    @property
    def client(self) -> mlflow.MlflowClient:
        return _client(self.tracking_uri)


class TrackingUnavailable(RuntimeError):
    """MLflow stayed unreachable for the whole retry budget (:data:`RETRY_BUDGET_S`)."""


#: How long one tracking call waits for an unreachable MLflow before the trial fails.
RETRY_BUDGET_S = float(os.environ.get("LIPTUNE_MLFLOW_RETRY_S", "120"))


def mlflow_unreachable(error: BaseException) -> bool:
    """Whether ``error`` means the tracking server could not be reached (connection refused or
    reset, a response cut off by a server that died, name resolution, timeouts), not that it
    refused the request."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, _TRANSPORT_ERRORS):
            return True
        if isinstance(seen, MlflowException) and any(
            marker in seen.message for marker in _UNREACHABLE_MARKERS
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


_TRANSPORT_ERRORS = (
    ConnectionError,
    TimeoutError,
    http.client.IncompleteRead,
    requests.ConnectionError,
    requests.exceptions.ChunkedEncodingError,  # "Connection broken": not a ConnectionError
)
# MLflow's REST client reports a transport failure as an MlflowException quoting the cause.
_UNREACHABLE_MARKERS = (
    "Max retries exceeded",
    "Connection refused",
    "ConnectionError",
    "Connection broken",
    "Connection aborted",
)


#: Every tracking call rides out an unreachable MLflow: waits of 1, 2, 4, 8, then 15 s, each logged,
#: for :data:`RETRY_BUDGET_S`; then :class:`TrackingUnavailable` (other errors pass through).
_retrying = RetryPolicy(
    initial_s=1.0,
    max_s=15.0,
    deadline_s=RETRY_BUDGET_S,
    transient=mlflow_unreachable,
    what="MLflow",
    give_up=TrackingUnavailable,
    log=logger,
).wrap


@lru_cache(maxsize=8)
def _client(tracking_uri: str) -> mlflow.MlflowClient:
    if not _is_database_store(tracking_uri):
        return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    # MLflow's tracking and registry stores each create a fresh database's tables and run its
    # Alembic history when they find tables missing, with no lock: workers starting together on
    # a fresh store fail with "table ... already exists" or "duplicate column". Each process
    # opens both stores (cached by MLflow per URI) once, under the database's schema lock (a
    # file beside a SQLite store, an advisory lock of its own key on PostgreSQL), so one process
    # creates the schema and the others find it complete.
    with schema_lock(tracking_uri, key=MLFLOW_SCHEMA_LOCK_KEY):
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        client.search_registered_models(max_results=1)
    return client


#: Key of the PostgreSQL advisory lock held while a process opens a fresh MLflow database; not
#: the study store's, so one database can hold both stores.
MLFLOW_SCHEMA_LOCK_KEY = 0x6D6C666C6F77


def _is_database_store(tracking_uri: str) -> bool:
    """Whether MLflow opens ``tracking_uri`` itself as a SQLite file or a PostgreSQL database
    (not an MLflow server, a file store, a hosted service or an in-memory database)."""
    if "://" not in tracking_uri or tracking_uri.startswith(("http", "file:", "databricks")):
        return False
    url = make_url(tracking_uri)
    named = url.database not in (None, "", ":memory:")
    return named and url.get_backend_name() in ("sqlite", "postgresql")


def experiment_id(config: TrackingConfig, name: str) -> str:
    """The id of the experiment ``name``, created (with the configured artifact location) if
    it does not exist yet; safe when several workers create it at once."""
    client = config.client
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None
    if config.artifact_root is not None:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:80]
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        location = (Path(config.artifact_root).resolve() / f"{slug}-{digest}").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1, "c": [1, 2]}}`` -> ``{"a.b": "1", "a.c": "[1, 2]"}``; ``None`` left out."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif value is not None:
            flat[name] = str(value)
    return flat


def start_run(
    config: TrackingConfig,
    *,
    experiment: str,
    run_name: str,
    params: Mapping[str, str],
    tags: Mapping[str, str],
    start_time: float | None = None,
) -> str:
    """Create a run with its tags, then write its parameters (one round trip); its id.

    The tags come with the creation, so a run is never without them (:func:`end_orphaned_runs`
    finds a dead writer's run by its trial number). The creation and the parameters are retried
    apart, so an outage between them does not create a second run; a run whose parameters could
    not be written is abandoned (:func:`abandon_run`)."""
    start_ms = int(1000 * (start_time if start_time is not None else time.time()))
    run_id = _create_run(config, experiment, run_name, start_ms, tags)
    try:
        _log_params(config, run_id, params)
    except TrackingUnavailable:
        abandon_run(config, run_id)
        raise
    return run_id


@_retrying
def _create_run(
    config: TrackingConfig,
    experiment: str,
    run_name: str,
    start_ms: int,
    tags: Mapping[str, str],
) -> str:
    client = config.client
    run = client.create_run(
        experiment_id(config, experiment),
        start_time=start_ms,
        tags={key: str(value) for key, value in tags.items()},
        run_name=run_name,
    )
    return run.info.run_id


@_retrying
def _log_params(config: TrackingConfig, run_id: str, params: Mapping[str, str]) -> None:
    config.client.log_batch(
        run_id, params=[Param(key, str(value)) for key, value in params.items()]
    )


# tracking URI -> ids of the runs this process left RUNNING when MLflow became unreachable
_abandoned: dict[str, set[str]] = {}
_abandoned_lock = threading.Lock()
ABANDONED_REASON = (
    "MLflow became unreachable while this run was written; its trial failed and its "
    "parameters were enqueued again"
)


def abandon_run(config: TrackingConfig, run_id: str) -> None:
    """Note that ``run_id`` was left RUNNING by an outage: :func:`end_abandoned_runs` ends it
    once MLflow answers again."""
    with _abandoned_lock:
        _abandoned.setdefault(config.tracking_uri, set()).add(run_id)


def end_abandoned_runs(config: TrackingConfig) -> list[str]:
    """End each run this process abandoned on ``config``'s store as FAILED, with the reason in
    :data:`FAILURE_TAG` (unless something else ended it meanwhile); the ids of those ended.
    Call it when MLflow has just answered (each call waits out an outage like any other)."""
    with _abandoned_lock:
        pending = sorted(_abandoned.get(config.tracking_uri, ()))
    ended = []
    for run_id in pending:
        if _end_abandoned_run(config, run_id):
            ended.append(run_id)
        with _abandoned_lock:
            _abandoned[config.tracking_uri].discard(run_id)
    return ended


ORPHANED_REASON = (
    "its worker stopped before the run was ended (trial {number} is {state}: a killed worker, "
    "or MLflow unreachable); ended by a later trial of the study"
)


@_retrying
def end_orphaned_runs(
    config: TrackingConfig, experiment: str, trial_states: Mapping[int, str]
) -> list[str]:
    """End as FAILED each RUNNING run of ``experiment`` whose trial (tag ``liptune.
    trial_number``) has a state other than ``RUNNING`` in ``trial_states`` (Optuna's, by trial
    number): a run is RUNNING only while a live trial writes it, so such a run's writer died (a
    killed worker, or one that exited before MLflow came back after an outage). Runs of trials
    not in ``trial_states`` are left alone. The ids of those ended."""
    client = config.client
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    ended = []
    runs = client.search_runs(
        [found.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    for run in runs:
        number = run.data.tags.get(TRIAL_NUMBER_TAG)
        state = trial_states.get(int(number)) if number and number.isdigit() else None
        if state is None or state == "RUNNING":
            continue
        _fail_run(client, run.info.run_id, ORPHANED_REASON.format(number=number, state=state))
        ended.append(run.info.run_id)
    return ended


def _fail_run(client: mlflow.MlflowClient, run_id: str, reason: str) -> None:
    """End ``run_id`` as FAILED with ``reason`` in :data:`FAILURE_TAG`."""
    client.log_batch(run_id, tags=[RunTag(FAILURE_TAG, reason)])
    client.set_terminated(run_id, status="FAILED")


@_retrying
def _end_abandoned_run(config: TrackingConfig, run_id: str) -> bool:
    client = config.client
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    _fail_run(client, run_id, ABANDONED_REASON)
    return True


@_retrying
def log_metrics(
    config: TrackingConfig,
    run_id: str,
    metrics: Mapping[str, float],
    *,
    epochs: Sequence[Mapping[str, float]] = (),
    end_times: Sequence[float] | None = None,
    model_uri: str | None = None,
) -> None:
    """Final ``metrics`` (step 0, linked to the logged model ``model_uri`` when given) and the
    per-epoch records, each at ``step = record["epoch"]`` and stamped with the epoch's end time
    (``end_times``, Unix seconds), all in one batch."""
    now = time.time()
    model_id = model_uri.rsplit("/", 1)[-1] if model_uri else None
    batch = [
        Metric(key, float(value), int(1000 * now), 0, model_id=model_id, run_id=run_id)
        for key, value in metrics.items()
    ]
    for index, record in enumerate(epochs):
        stamp = int(1000 * (end_times[index] if end_times is not None else now))
        batch.extend(
            Metric(key, float(value), stamp, int(record["epoch"]))
            for key, value in record.items()
            if key != "epoch"
        )
    config.client.log_batch(run_id, metrics=batch)


@_retrying
def set_tags(config: TrackingConfig, run_id: str, tags: Mapping[str, str]) -> None:
    config.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


@_retrying
def end_run(config: TrackingConfig, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED``."""
    config.client.set_terminated(run_id, status=status)


@_retrying
def log_model(
    config: TrackingConfig,
    run_id: str,
    model: nn.Module,
    input_example: torch.Tensor,
    certificate: Certificate,
) -> str:
    """Log ``model`` (a plain, picklable module: the exported model, never a parametrised one)
    as the run's logged model ``"model"``: ``mlflow.pytorch``'s format, answered as a pyfunc by
    :mod:`liptune.serving` with ``certificate`` (the trial's mode and guaranteed bound), with
    its signature (a params schema for ``eps``), ``input_example`` (a small batch) and the
    core's source (:func:`model_code_paths`); its requirements are torch and numpy. Returns the
    logged model's URI (``models:/m-...``), also stored in the run's tag
    ``liptune.model_uri``."""
    example = input_example.detach().cpu().numpy()
    model = model.cpu().eval()
    model_id = _new_logged_model(config, run_id, MODEL_NAME)
    pytorch_logger = logging.getLogger("mlflow.pytorch")
    with using_tracking_uri(config.tracking_uri):
        previous_level = pytorch_logger.level
        pytorch_logger.setLevel(logging.ERROR)  # the notice that pickles can run code
        try:
            info = Model.log(
                artifact_path=None,
                name=MODEL_NAME,
                flavor=_CertifiedPyTorch,
                run_id=run_id,
                model_id=model_id,
                pytorch_model=model,
                certificate=certificate,
                signature=certified_signature(example.dtype, certificate),
                input_example=example,
                serialization_format="pickle",
                code_paths=model_code_paths(model),
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    f"numpy=={np.__version__}",
                ],
                metadata={"liptune.certificate": certificate.to_json()},
            )
        finally:
            pytorch_logger.setLevel(previous_level)
    set_tags(config, run_id, {MODEL_URI_TAG: info.model_uri})
    return info.model_uri


def certified_signature(dtype: np.dtype, certificate: Certificate) -> ModelSignature:
    """The served model's signature: a batch of inputs in, one row per input out (``label``,
    ``radius``, ``logits``, and ``certified`` when the request's params give ``eps``)."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(dtype), (-1, *certificate.input_shape))]),
        outputs=Schema(
            [
                ColSpec("long", "label"),
                ColSpec("double", "radius"),
                ColSpec(Array("double"), "logits"),
                ColSpec("boolean", "certified", required=False),
            ]
        ),
        params=ParamSchema([ParamSpec("eps", "double", None)]),
    )


class _CertifiedPyTorch:
    """The flavor :meth:`mlflow.models.Model.log` saves the trial's model with:
    ``mlflow.pytorch.save_model``'s folder, with the certificate beside the network and the
    ``python_function`` flavor loaded by :mod:`liptune.serving` instead of ``mlflow.pytorch``
    (the ``pytorch`` flavor is untouched)."""

    __name__ = "mlflow.pytorch"

    @staticmethod
    def save_model(path: str, mlflow_model: Model, certificate: Certificate, **kwargs: Any) -> None:
        mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        pyfunc = mlflow_model.flavors[mlflow.pyfunc.FLAVOR_NAME]
        certificate.save(Path(path) / pyfunc[mlflow.pyfunc.DATA])
        pyfunc[mlflow.pyfunc.MAIN] = LOADER_MODULE
        mlflow_model.save(str(Path(path) / "MLmodel"))


@_retrying
def log_onnx(
    config: TrackingConfig, run_id: str, onnx_path: Path, input_example: torch.Tensor
) -> str:
    """The ONNX file as the run's artifact ``model.onnx`` and as the run's ``mlflow.onnx``
    logged model ``"onnx"`` (signature and ``input_example`` from onnxruntime's outputs, every
    output of the graph: ``output`` and ``radius``), run with the execution providers this
    machine's onnxruntime has (:func:`onnx_providers`). Returns that model's URI."""
    if onnx_path.name != ONNX_ARTIFACT:
        raise ValueError(f"name the ONNX file {ONNX_ARTIFACT!r}, got {onnx_path.name!r}")
    config.client.log_artifact(run_id, str(onnx_path))
    import onnxruntime

    example = input_example.detach().cpu().numpy()
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {input_name: example}), strict=True))
    model_id = _new_logged_model(config, run_id, ONNX_MODEL_NAME)
    with using_tracking_uri(config.tracking_uri):
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name=ONNX_MODEL_NAME,
            run_id=run_id,
            model_id=model_id,
            signature=infer_signature(example, outputs if len(outputs) > 1 else outputs[names[0]]),
            input_example=example,
            save_as_external_data=False,
            onnx_execution_providers=onnx_providers(),
            pip_requirements=[
                f"onnxruntime=={onnxruntime.__version__}",
                f"onnx=={onnx.__version__}",
            ],
        )
    return info.model_uri


def onnx_providers() -> list[str]:
    """MLflow's default ONNX execution providers (CUDA, then CPU) that this machine's
    onnxruntime has: a CPU machine logs ``["CPUExecutionProvider"]``, so loading the model
    (which logging does, to check its input example) does not warn that CUDA is missing."""
    import onnxruntime

    available = set(onnxruntime.get_available_providers())
    return [p for p in mlflow.onnx.ONNX_EXECUTION_PROVIDERS if p in available] or [
        "CPUExecutionProvider"
    ]


def _new_logged_model(config: TrackingConfig, run_id: str, name: str) -> str:
    """A logged model of the run, in the run's experiment (``mlflow.<flavor>.log_model`` alone
    would create it in the process's active experiment, ``Default``, whose artifacts sit in
    ``./mlruns`` under the working directory); its id."""
    client = config.client
    experiment = client.get_run(run_id).info.experiment_id
    return client.create_logged_model(experiment, name=name, source_run_id=run_id).model_id


@_retrying
def log_radii(
    config: TrackingConfig,
    run_id: str,
    *,
    radii: np.ndarray,
    correct: np.ndarray,
    labels: np.ndarray,
) -> None:
    """The test split's certificates as ``certificates/radii.npz``: arrays ``radii`` (float32,
    (N,)), ``correct`` (bool, (N,)) and ``labels`` (int64, (N,))."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(RADII_ARTIFACT).name
        np.savez_compressed(
            path,
            radii=np.asarray(radii, dtype=np.float32),
            correct=np.asarray(correct, dtype=bool),
            labels=np.asarray(labels, dtype=np.int64),
        )
        config.client.log_artifact(
            run_id, str(path), artifact_path=str(Path(RADII_ARTIFACT).parent)
        )


@_retrying
def log_files(config: TrackingConfig, run_id: str, files: Mapping[str, bytes]) -> None:
    """Write ``files`` (artifact path, e.g. ``conditioned/network.pt`` -> content) as artifacts of
    ``run_id``."""
    with tempfile.TemporaryDirectory() as folder:
        for path, content in files.items():
            local = Path(folder) / path
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(content)
            parent = str(Path(path).parent)
            config.client.log_artifact(
                run_id, str(local), artifact_path=None if parent == "." else parent
            )


@_retrying
def read_files(config: TrackingConfig, run_id: str, paths: Sequence[str]) -> dict[str, bytes]:
    """The artifacts ``paths`` of ``run_id``, by path (what :func:`log_files` wrote)."""
    with tempfile.TemporaryDirectory() as folder:
        return {
            path: Path(config.client.download_artifacts(run_id, path, folder)).read_bytes()
            for path in paths
        }


def register_model(
    tracking_uri: str,
    model_uri_or_run_id: str,
    name: str,
    aliases: Sequence[str] = (),
) -> str:
    """Register a logged model under ``name`` and point ``aliases`` at the new version.

    ``model_uri_or_run_id`` is a logged model's URI (``models:/m-...``) or the id of a run whose
    ``liptune.model_uri`` tag names one. Returns ``models:/NAME@ALIAS`` (the first alias) or
    ``models:/NAME/VERSION``: ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` answer
    each input with its label and certified radius, ``mlflow.pytorch.load_model`` gives the
    network.
    """
    client = _client(tracking_uri)
    model_uri = model_uri_or_run_id
    if _RUN_ID.match(model_uri_or_run_id):
        tags = client.get_run(model_uri_or_run_id).data.tags
        if MODEL_URI_TAG not in tags:
            raise ValueError(
                f"run {model_uri_or_run_id} logged no model (no {MODEL_URI_TAG} tag): "
                "only completed trials can be registered"
            )
        model_uri = tags[MODEL_URI_TAG]
    if not model_uri.startswith("models:/m-"):
        raise ValueError(
            f"expected a logged model URI (models:/m-...) or a run id, got {model_uri_or_run_id!r}"
        )
    logged = client.get_logged_model(model_uri.removeprefix("models:/"))
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # MLflow resolves a `models:/m-...` source through the process-wide tracking URI.
    with using_tracking_uri(tracking_uri):
        version = client.create_model_version(
            name,
            source=model_uri,
            run_id=logged.source_run_id,
            model_id=logged.model_id,
            await_creation_for=0,
        )
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    if aliases:
        return f"models:/{name}@{aliases[0]}"
    return f"models:/{name}/{version.version}"
