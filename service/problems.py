"""Every error as ``application/problem+json`` (RFC 9457).

A problem body has ``type``, ``title``, ``status``, ``detail`` and, for input errors, ``errors``:
a list of ``{"field", "reason", "type"}`` where ``field`` is the dotted path of the offending
value (``body.search_space.margin.low``, ``query.eps``, ``header.Idempotency-Key``). ``detail``
repeats the first error so that a client that shows one line shows the useful one.

Raise :class:`Problem` in a route; :func:`install` makes the app answer validation errors, HTTP
errors, over-large bodies and unexpected exceptions in this form; an unreachable database is a
503 with ``Retry-After``, never a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import optuna
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic_core import to_json
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.common import redact, store_unreachable

PROBLEM_MEDIA_TYPE = "application/problem+json"
#: Problem types are documented on this page of the API docs (an anchor per ``type``).
TYPE_BASE = "/docs#problem-"

logger = logging.getLogger("liptune.service")


class Problem(Exception):
    """An error the client can act on: status, a short title, what exactly is wrong.

    ``kind`` names the problem type (``invalid-spec``, ``unknown-study``, ...); ``extensions``
    are extra members of the body (e.g. ``errors``, ``closest``).
    """

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.headers = headers
        self.extensions = extensions


def field_error(field: str, reason: str, kind: str = "value_error") -> dict[str, str]:
    return {"field": field, "reason": reason, "type": kind}


def invalid_input(errors: Sequence[dict[str, str]], status: int = 422) -> Problem:
    """A 422 (or ``status``) problem listing field errors, the first one as the detail."""
    first = errors[0]
    return Problem(status, "invalid-input", f"{first['field']}: {first['reason']}", errors=errors)


def problem_response(
    status: int, kind: str, detail: str, headers: dict[str, str] | None = None, **extensions: Any
) -> Response:
    body = {
        "type": TYPE_BASE + kind,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **extensions,
    }
    return Response(
        redact(to_json(body, inf_nan_mode="strings").decode()),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def _field_path(location: Sequence[Any]) -> str:
    return ".".join(str(part) for part in location)


def _reason(error: dict[str, Any]) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("literal_error", "enum"):
        return f"unknown value {error.get('input')!r}: {message}"
    if error["type"] in ("union_tag_invalid", "unknown_model"):
        return f"unknown {error['ctx'].get('discriminator', 'tag')}: {message}"
    return message


def validation_errors(errors: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Pydantic/FastAPI errors as ``{"field", "reason", "type"}`` entries."""
    return [
        field_error(_field_path(error["loc"]), _reason(error), error["type"]) for error in errors
    ]


async def _on_validation_error(_request: Request, error: RequestValidationError) -> Response:
    errors = list(error.errors())
    malformed = [e for e in errors if e["type"] == "json_invalid"]
    if malformed:
        reason = malformed[0].get("ctx", {}).get("error", "not valid JSON")
        return problem_response(
            400,
            "malformed-json",
            f"the request body is not valid JSON: {reason}",
            errors=[field_error("body", f"malformed JSON: {reason}", "json_invalid")],
        )
    entries = validation_errors(errors)
    return problem_response(
        422, "invalid-input", f"{entries[0]['field']}: {entries[0]['reason']}", errors=entries
    )


async def _on_problem(_request: Request, problem: Problem) -> Response:
    return problem_response(
        problem.status, problem.kind, problem.detail, headers=problem.headers, **problem.extensions
    )


async def _on_http_error(_request: Request, error: HTTPException) -> Response:
    kinds = {401: "unauthorized", 403: "forbidden", 404: "not-found", 405: "method-not-allowed"}
    detail = error.detail if isinstance(error.detail, str) else HTTPStatus(error.status_code).phrase
    return problem_response(
        error.status_code,
        kinds.get(error.status_code, "http-error"),
        detail,
        headers=dict(error.headers or {}),
    )


#: Seconds a client is asked to wait before retrying while a store is unreachable.
RETRY_AFTER_S = 5


def _pool_exhausted(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, sqlalchemy.exc.TimeoutError):
            return True
        error = error.__cause__ or error.__context__
    return False


async def _on_store_error(request: Request, error: Exception) -> Response:
    if _pool_exhausted(error):
        logger.warning(
            "%s %s: overloaded, every pooled database connection is busy: %s",
            request.method,
            request.url.path,
            error,
        )
        return problem_response(
            503,
            "overloaded",
            "the server is busy: every database connection is in use; retry after the delay "
            "in Retry-After",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if store_unreachable(error):
        logger.warning(
            "%s %s: the database is unreachable: %s", request.method, request.url.path, error
        )
        return problem_response(
            503,
            "store-unavailable",
            "the database is unreachable for now; retry after the delay in Retry-After",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    return await _on_unexpected(request, error)


async def _on_unexpected(request: Request, error: Exception) -> Response:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return problem_response(
        500, "internal-error", "the server failed to answer; the error is in its log"
    )


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets a 413 problem before any route
    sees it, whether the size is announced (``Content-Length``) or streamed (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> Problem:
        return Problem(
            413,
            "body-too-large",
            f"the request body is larger than the limit of {self.max_bytes} bytes",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            problem = self._too_large()
            response = problem_response(problem.status, problem.kind, problem.detail)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            # Raised inside the app, where the Problem handler answers it.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)


def install(app: FastAPI, max_body_bytes: int) -> None:
    """Answer every error of ``app`` as problem+json and cap request bodies."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(HTTPException, _on_http_error)
    # Store errors get their own handlers: the catch-all one answers, then re-raises.
    app.add_exception_handler(sqlalchemy.exc.SQLAlchemyError, _on_store_error)
    app.add_exception_handler(optuna.exceptions.StorageInternalError, _on_store_error)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
