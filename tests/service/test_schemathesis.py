"""Property-based API tests: schemathesis generates requests for every operation of the app's
OpenAPI schema; none may end in a server error (5xx). Bounded: a few examples per operation."""

from __future__ import annotations

from pathlib import Path

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from service.app import create_app
from service.config import Settings

EXAMPLES_PER_OPERATION = 12


def test_no_server_error_on_any_operation(tmp_path: Path):
    app = create_app(Settings(home=tmp_path, cache_ttl_s=0, max_trials=50, max_epochs=20))
    # The first /ready creates MLflow's store (seconds): once here, not under a request timeout.
    ready = TestClient(app).get("/ready")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "mlflow": "ok"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15  # every route of the API is in the schema

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def no_server_error(case) -> None:
            case.call_and_validate(checks=[not_a_server_error])

        try:
            no_server_error()
        except Exception as error:
            failures[operation.label] = error
    assert not failures, "\n\n".join(f"{label}: {error}" for label, error in failures.items())
