"""Riding out store outages: retry a storage operation with back-off while the database is away.

A worker's loop is a sequence of storage operations (claim, attach, heartbeat, tell, status
polls, ...), each one method of :class:`worker.study._store.StudyStore` marked :func:`retried`.
:func:`retrying` gives a store a policy under which every such method runs: when a call fails
because the database cannot be reached (a refused or dropped connection, SQLite's lock timeout;
:func:`store_unreachable`), it is logged and tried again after a back-off doubling from
:attr:`RetryPolicy.initial_s` to :attr:`RetryPolicy.max_s`, until :attr:`RetryPolicy.deadline_s`
has passed; then the error is raised. Any other error is raised at once (a bug is not an
outage). So a PostgreSQL restart of a few seconds delays a trial but loses nothing: its result
is told when the store is back. :mod:`worker.tracking._mlflow` rides out MLflow outages with the
same :class:`RetryPolicy`, its own predicate and give-up exception.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, Protocol, TypeVar

import optuna
import sqlalchemy.exc

logger = logging.getLogger("liptune.worker")
T = TypeVar("T")
P = ParamSpec("P")


def store_unreachable(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) says a database could not be reached or dropped
    the connection, or SQLite's file stayed locked past its timeout, as opposed to a bug or a
    bad query. Optuna wraps SQLAlchemy's errors in ``StorageInternalError``: the cause counts."""
    while error is not None:
        if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
            return True
        if isinstance(
            error,
            sqlalchemy.exc.OperationalError
            | sqlalchemy.exc.InterfaceError
            | sqlalchemy.exc.DisconnectionError
            | sqlalchemy.exc.TimeoutError,
        ):
            return True
        if not isinstance(
            error, optuna.exceptions.StorageInternalError | sqlalchemy.exc.SQLAlchemyError
        ):
            return False
        error = error.__cause__ or error.__context__
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """Back-off doubling from ``initial_s`` to ``max_s`` while ``transient(error)`` holds; the
    last wait ends at ``deadline_s``, and an error after it is given up on: raised as it is, or,
    with ``give_up``, as that exception (chained from it). Errors that are not ``transient``
    are raised at once. Each wait is logged to ``log``, naming ``what`` was unreachable.

    The default is the study store's: :func:`store_unreachable`, errors raised as they are;
    :mod:`worker.tracking._mlflow` rides out MLflow outages with its own predicate and exception.
    """

    initial_s: float = 0.5
    max_s: float = 10.0
    deadline_s: float = 600.0
    transient: Callable[[BaseException], bool] = store_unreachable
    what: str = "store"
    give_up: Callable[[str], Exception] | None = None
    log: logging.Logger = logger

    def call(self, operation: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``operation(*args, **kwargs)``, retried while its errors are ``transient``."""
        deadline = time.monotonic() + self.deadline_s
        delay = self.initial_s
        name = getattr(operation, "__name__", "a storage operation")
        attempt = 1
        while True:
            try:
                return operation(*args, **kwargs)
            except Exception as error:
                if not self.transient(error):
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    if self.give_up is None:
                        raise
                    raise self.give_up(
                        f"{self.what} unreachable for {self.deadline_s:g} s ({name}): "
                        f"{type(error).__name__}"
                    ) from error
                wait = min(delay, left)
                self.log.warning(
                    f"{self.what} unreachable in %s (attempt %d), retrying in %.3g s: %s: %s",
                    name,
                    attempt,
                    wait,
                    type(error).__name__,
                    next(iter(str(error).splitlines()), ""),
                )
            time.sleep(wait)
            delay = min(self.max_s, 2 * delay)
            attempt += 1

    def wrap(self, operation: Callable[P, T]) -> Callable[P, T]:
        """``operation`` retried under this policy (a decorator)."""

        @functools.wraps(operation)
        def retried(*args: P.args, **kwargs: P.kwargs) -> T:
            return self.call(operation, *args, **kwargs)

        return retried


class _Retriable(Protocol):
    #: Set by :func:`retrying`; ``None``: each :func:`retried` method is called once.
    retry_policy: RetryPolicy | None


S = TypeVar("S", bound=_Retriable)


def retried(method: Callable[Concatenate[S, P], T]) -> Callable[Concatenate[S, P], T]:
    """Mark a store method as a storage operation: called under the instance's
    ``retry_policy`` when :func:`retrying` gave it one, once otherwise. Its signature is kept
    for the type checker; a method without it is never retried."""

    @functools.wraps(method)
    def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        policy = self.retry_policy
        if policy is None:
            return method(self, *args, **kwargs)
        return policy.call(method, self, *args, **kwargs)

    call.retried = True  # type: ignore[attr-defined]
    return call


def retrying(store: S, policy: RetryPolicy | None = None) -> S:
    """``store`` with each of its :func:`retried` methods retried under ``policy`` (default
    :class:`RetryPolicy`); the object stays the same."""
    store.retry_policy = policy or RetryPolicy()
    return store
