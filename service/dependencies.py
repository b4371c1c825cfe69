"""FastAPI dependencies: settings, database sessions, the study store, the study cache and its
snapshots, and API-key checks.

The ones that never block are ``async``: FastAPI runs them on the event loop instead of handing
each to the thread pool (which costs more than they do).

Keys are compared as SHA-256 digests with :func:`hmac.compare_digest` against every configured
hash (no early exit), so the time taken says nothing about how much of a key matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from dataclasses import dataclass

import optuna
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.cache import StudyCache, StudySnapshot, UnknownStudy
from service.config import HASH_PREFIX, Settings
from service.problems import Problem
from worker.study import StudyStore


@dataclass
class Resources:
    """What the app opens once at start and shares between requests (``app.state.resources``)."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: StudyStore
    cache: StudyCache
    tracking_uri: str

    @property
    def storage(self) -> optuna.storages.RDBStorage:
        """The store's Optuna storage (what :mod:`worker.study._studies`' functions take)."""
        return self.store.storage


async def get_resources(request: Request) -> Resources:
    return request.app.state.resources


async def get_settings(request: Request) -> Settings:
    return request.app.state.resources.settings


def get_db(resources: Resources = Depends(get_resources)) -> Iterator[Session]:
    """A session per request, closed afterwards (routes commit what they write)."""
    with resources.sessions() as session:
        yield session


async def get_cache(resources: Resources = Depends(get_resources)) -> StudyCache:
    return resources.cache


def load_snapshot(cache: StudyCache, study_id: str) -> StudySnapshot:
    """The study's snapshot, refreshed if stale (may read the database), or a 404 problem."""
    try:
        return cache.snapshot(study_id)
    except UnknownStudy:
        raise Problem(404, "unknown-study", f"there is no study with id {study_id!r}") from None


async def study_snapshot(study_id: str, cache: StudyCache = Depends(get_cache)) -> StudySnapshot:
    """Dependency: the study's snapshot, read in the thread pool only when it must be
    refreshed."""
    snapshot = cache.peek(study_id)
    if snapshot is not None:
        return snapshot
    return await run_in_threadpool(load_snapshot, cache, study_id)


_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer = HTTPBearer(auto_error=False)


_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _key_matches(key: str, hashes: list[str]) -> bool:
    digest = HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()
    matched = False
    for expected in hashes:
        matched |= hmac.compare_digest(digest.encode(), expected.encode())
    return matched


def _check_key(
    settings: Settings, header_key: str | None, bearer: HTTPAuthorizationCredentials | None
) -> None:
    key = header_key or (bearer.credentials if bearer is not None else None)
    if key is None:
        raise Problem(
            401,
            "unauthorized",
            "this endpoint needs an API key: send `X-API-Key: KEY` or `Authorization: Bearer KEY`",
            headers=_CHALLENGE,
        )
    if not _key_matches(key, settings.api_key_hashes):
        raise Problem(401, "unauthorized", "the API key is not valid", headers=_CHALLENGE)


async def require_write_key(
    settings: Settings = Depends(get_settings),
    header_key: str | None = Depends(_api_key_header),
    bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> None:
    """State-changing endpoints: a valid key when any key is configured."""
    if settings.api_key_hashes:
        _check_key(settings, header_key, bearer)


async def require_read_key(
    settings: Settings = Depends(get_settings),
    header_key: str | None = Depends(_api_key_header),
    bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> None:
    """Reads: a valid key when keys are configured and ``protect_reads`` is on."""
    if reads_protected(settings):
        _check_key(settings, header_key, bearer)


def reads_protected(settings: Settings) -> bool:
    """Whether reads need a key: ``protect_reads`` with at least one key configured."""
    return bool(settings.api_key_hashes) and settings.protect_reads
