"""Everything MLflow: one experiment per study, one run per trial with its parameters, metrics,
models and certified radii, the model registry, and the scoped process-wide tracking URI that
MLflow's fluent calls read."""

from worker.tracking._mlflow import (
    ABANDONED_REASON,
    FAILURE_TAG,
    ONNX_ARTIFACT,
    TRIAL_NUMBER_TAG,
    TrackingConfig,
    TrackingUnavailable,
    register_model,
    using_tracking_uri,
)

__all__ = [
    "ABANDONED_REASON",
    "FAILURE_TAG",
    "ONNX_ARTIFACT",
    "TRIAL_NUMBER_TAG",
    "TrackingConfig",
    "TrackingUnavailable",
    "register_model",
    "using_tracking_uri",
]
