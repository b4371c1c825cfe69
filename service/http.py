"""HTTP conventions the routes share: validators on JSON reads and links on pages of results.

- ``ETag``/``If-None-Match``: a JSON read carries a strong ETag, a digest of the body, and
  answers ``304 Not Modified`` (no body) when the client's ``If-None-Match`` names it. The
  digest, not the snapshot's version number, because several API processes count versions
  separately: the same version in two of them may hold different trials.
- Pages (``?page=&size=``): a ``Link`` header (RFC 8288) with ``first``, ``prev``, ``next``
  and ``last``, each the request's URL with only ``page`` changed.
"""

from __future__ import annotations

import hashlib
from typing import Any

from fastapi import Request, Response

from service.schemas import render_json


def _etag(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def _matches(request: Request, etag: str) -> bool:
    wanted = request.headers.get("if-none-match")
    if wanted is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in wanted.split(",")}
    return "*" in tags or etag in tags


def conditional_json(
    request: Request, body: bytes, headers: dict[str, str] | None = None
) -> Response:
    """``body`` (JSON bytes) with its ETag, or ``304`` when the client already has it."""
    etag = _etag(body)
    all_headers = {**(headers or {}), "ETag": etag}
    if _matches(request, etag):
        return Response(status_code=304, headers=all_headers)
    return Response(body, media_type="application/json", headers=all_headers)


def page_links(request: Request, page: dict[str, Any]) -> dict[str, str]:
    """The ``Link`` header of a fastapi-pagination page (``page``, ``pages``), or none."""
    number, pages = page["page"], max(1, page["pages"] or 1)
    rels = {"first": 1, "last": pages}
    if number > 1:
        rels["prev"] = min(number - 1, pages)
    if number < pages:
        rels["next"] = number + 1
    links = [
        f'<{request.url.include_query_params(page=target)}>; rel="{rel}"'
        for rel, target in rels.items()
    ]
    return {"Link": ", ".join(links)}


def paged_json(request: Request, page: dict[str, Any]) -> Response:
    """A page of results with its ``Link`` header and ETag."""
    return conditional_json(request, render_json(page), page_links(request, page))
