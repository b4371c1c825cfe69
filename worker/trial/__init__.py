"""One trial: its data set (:mod:`worker.trial.datasets`), its network from the model registry
(the zoo and plugins), its loss from the loss registry, the training loop, the evaluation with
certificates from the guaranteed bound and their attack check, and the cost and device
estimates that admission and the worker loop read before anything runs."""

from worker.trial._augment import Augment, augmentation_error, build_augmentation
from worker.trial._certificates import AttackSummary, RadiiSummary
from worker.trial._costs import estimate, study_cost, warm_up
from worker.trial._devices import (
    study_memory_bytes,
    trial_budget_bytes,
    trial_memory_bytes,
)
from worker.trial._evaluation import accuracy_metrics, mean_certified_radius, predict
from worker.trial._losses import LOSSES, LossInfo, ParamInfo, build_loss, margin_limit
from worker.trial._models import (
    MODELS,
    ModelInfo,
    build_model,
    certificate_mode,
    check_model,
    model_info,
    register_model,
    registered_models,
)
from worker.trial._run import (
    LIPSCHITZ_TOLERANCE,
    TrialOutcome,
    TrialResult,
    attack_check,
    run_trial,
)
from worker.trial._training import make_optimizer, resolve_device, train, train_epoch

__all__ = [
    "LIPSCHITZ_TOLERANCE",
    "LOSSES",
    "MODELS",
    "AttackSummary",
    "Augment",
    "LossInfo",
    "ModelInfo",
    "ParamInfo",
    "RadiiSummary",
    "TrialOutcome",
    "TrialResult",
    "accuracy_metrics",
    "attack_check",
    "augmentation_error",
    "build_augmentation",
    "build_loss",
    "build_model",
    "certificate_mode",
    "check_model",
    "estimate",
    "make_optimizer",
    "margin_limit",
    "mean_certified_radius",
    "model_info",
    "predict",
    "register_model",
    "registered_models",
    "resolve_device",
    "run_trial",
    "study_cost",
    "study_memory_bytes",
    "train",
    "train_epoch",
    "trial_budget_bytes",
    "trial_memory_bytes",
    "warm_up",
]
