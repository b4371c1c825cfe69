"""The study database behind :class:`StudyStore`: Optuna's storage, the trial claims, the typed
trial record and certified radii kept as trial attributes, the study's own annotations (spec,
status)."""

from worker.study._claims import Claim, ClaimCounts, ClaimState, StaleClaim
from worker.study._engine import (
    DEFAULT_GRACE_PERIOD_S,
    DEFAULT_HEARTBEAT_INTERVAL_S,
    open_storage,
)
from worker.study._record import TrialAttributes
from worker.study._store import SchemaMissing, StudyStore
from worker.study._studies import (
    SPEC_ATTR,
    STATUSES,
    StudyStatus,
    cancel_study,
    create_study,
    experiment_name,
    load_spec,
    load_study,
    optuna_study_name,
    set_budget,
    set_status,
    study_status,
)

__all__ = [
    "DEFAULT_GRACE_PERIOD_S",
    "DEFAULT_HEARTBEAT_INTERVAL_S",
    "SPEC_ATTR",
    "STATUSES",
    "Claim",
    "ClaimCounts",
    "ClaimState",
    "SchemaMissing",
    "StaleClaim",
    "StudyStatus",
    "StudyStore",
    "TrialAttributes",
    "cancel_study",
    "create_study",
    "experiment_name",
    "load_spec",
    "load_study",
    "open_storage",
    "optuna_study_name",
    "set_budget",
    "set_status",
    "study_status",
]
