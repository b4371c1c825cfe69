"""What every part of the worker shares: the one retry of store operations, the databases' URL
drivers, schema lock and engine settings, the data directory layout under ``LIPTUNE_HOME``,
credential redaction for logs and responses, and the plugin loader over ``importlib.metadata``
entry points."""

from worker.common._databases import engine_kwargs, resolve_url, schema_lock
from worker.common._paths import (
    SYSTEM_DATA_ROOT,
    default_artifact_root,
    default_data_roots,
    default_storage_url,
    default_tracking_uri,
    liptune_home,
)
from worker.common._plugins import EntryPoints
from worker.common._redact import install_log_redaction, redact, without_credentials
from worker.common._retry import RetryPolicy, retried, retrying, store_unreachable

__all__ = [
    "SYSTEM_DATA_ROOT",
    "EntryPoints",
    "RetryPolicy",
    "default_artifact_root",
    "default_data_roots",
    "default_storage_url",
    "default_tracking_uri",
    "engine_kwargs",
    "install_log_redaction",
    "liptune_home",
    "redact",
    "resolve_url",
    "retried",
    "retrying",
    "schema_lock",
    "store_unreachable",
    "without_credentials",
]
