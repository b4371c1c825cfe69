"""The one retry: every storage operation of the study store is marked ``retried`` (a method
without the mark would silently not be retried), runs once without a policy, and rides out an
unreachable database under one."""

from __future__ import annotations

import inspect
import logging

import pytest
import sqlalchemy.exc

from worker.common._retry import RetryPolicy, retried, retrying
from worker.study._store import StudyStore


def test_every_storage_operation_of_the_store_is_retried() -> None:
    operations = {
        name: member
        for name, member in vars(StudyStore).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }
    assert len(operations) >= 32
    assert [name for name, member in operations.items() if not hasattr(member, "retried")] == []


class _Flaky:
    def __init__(self, failures: int) -> None:
        self.retry_policy: RetryPolicy | None = None
        self.failures = failures
        self.calls = 0

    @retried
    def read(self, value: int) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError())
        return value


def test_without_a_policy_an_operation_runs_once() -> None:
    store = _Flaky(failures=1)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        store.read(3)
    assert store.calls == 1


def test_under_a_policy_an_unreachable_store_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    store = retrying(_Flaky(failures=2), RetryPolicy(initial_s=0.01, max_s=0.02, deadline_s=5))
    with caplog.at_level(logging.WARNING, logger="liptune.worker"):
        assert store.read(3) == 3
    assert store.calls == 3
    assert [record.args[0] for record in caplog.records] == ["read", "read"]  # type: ignore[index]


def test_past_the_deadline_the_error_is_raised() -> None:
    store = retrying(_Flaky(failures=100), RetryPolicy(initial_s=0.01, max_s=0.02, deadline_s=0.1))
    with pytest.raises(sqlalchemy.exc.OperationalError):
        store.read(3)
    assert 2 < store.calls < 100
