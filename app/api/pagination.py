"""Listings a page at a time: `?limit=` and `?cursor=`, newest first, the next page in headers.

Listings were unbounded: after an npz of 100 000 members, every `GET /v1/datasets` was 5 MB and
2–3 s. Each listing now answers at most `limit` records (default `DEFAULT_LIMIT`, at most
`MAX_LIMIT`), newest first, in a stable order (creation time, then id, both descending: two rows
made in the same microsecond still come in one order). The body stays a JSON array, so clients
that read one page keep working; when more records follow, the response says where the next page
is, in two headers:

- `Link: <…?cursor=…>; rel="next"` (RFC 8288, as GitHub's API does);
- `X-Next-Cursor`: the cursor alone, which optiforge_client and the console send back.

A cursor is a keyset position (the last record's creation time in microseconds, then its id), not
an offset: records made or deleted between two pages neither repeat nor skip the others, and any
cursor that fits its pattern is a position (so the OpenAPI document says exactly which are valid).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, Query, Request, Response
from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
NEXT_CURSOR_HEADER = "X-Next-Cursor"
#: A cursor: microseconds since 1970 (UTC), '.', a record id.
CURSOR_PATTERN = r"^[0-9]{1,17}\.[A-Za-z0-9_-]{1,64}$"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: The headers of a listing's 200, for the OpenAPI document (`responses=` of each list route).
PAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "one page, newest first; the next page's address is in `Link` and `X-Next-Cursor`",
        "headers": {
            "Link": {
                "description": 'the next page: `<url>; rel="next"` (absent on the last page)',
                "schema": {"type": "string"},
            },
            NEXT_CURSOR_HEADER: {
                "description": "the `cursor` of the next page (absent on the last page)",
                "schema": {"type": "string", "pattern": CURSOR_PATTERN},
            },
        },
    }
}


@dataclass(frozen=True)
class PageRequest:
    """What page a listing asks for: at most `limit` records, after `cursor` (None: the first)."""

    limit: int
    cursor: str | None


def page_request(
    limit: Annotated[
        int, Query(ge=1, le=MAX_LIMIT, description=f"records per page (default {DEFAULT_LIMIT})")
    ] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None,
        Query(
            pattern=CURSOR_PATTERN,
            max_length=100,
            description="where the page starts: the `X-Next-Cursor` of the previous page; absent: the newest",
        ),
    ] = None,
) -> PageRequest:
    return PageRequest(limit, cursor)


PageDep = Annotated[PageRequest, Depends(page_request)]


def _position(cursor: str) -> tuple[datetime, str]:
    micros, record_id = cursor.split(".", 1)
    return _EPOCH + timedelta(microseconds=min(int(micros), 10**17)), record_id


def _cursor(created_at: datetime, record_id: str) -> str:
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)
    return f"{(created_at - _EPOCH) // timedelta(microseconds=1)}.{record_id}"


def fetch_page(
    session: Session, query: Select, entity: Any, page: PageRequest
) -> tuple[list[Any], str | None]:
    """The records of `query` (over `entity`, which has `created_at` and `id`) on this page, and the
    cursor of the next (None on the last page)."""
    created_at, record_id = entity.created_at, entity.id
    if page.cursor is not None:
        if not re.fullmatch(CURSOR_PATTERN, page.cursor):  # the Query pattern holds it; a direct call too
            raise ValueError(f"not a cursor: {page.cursor!r}")
        at, last_id = _position(page.cursor)
        query = query.where(or_(created_at < at, and_(created_at == at, record_id < last_id)))
    query = query.order_by(None).order_by(created_at.desc(), record_id.desc()).limit(page.limit + 1)
    records = list(session.scalars(query))
    if len(records) <= page.limit:
        return records, None
    records = records[: page.limit]
    return records, _cursor(records[-1].created_at, records[-1].id)


def page_response(request: Request, body: bytes, next_cursor: str | None) -> Response:
    """A listing's response: `body` (a JSON array), and where the next page is, if there is one."""
    headers = {}
    if next_cursor is not None:
        headers[NEXT_CURSOR_HEADER] = next_cursor
        headers["Link"] = f'<{request.url.include_query_params(cursor=next_cursor)}>; rel="next"'
    return Response(body, media_type="application/json", headers=headers)
