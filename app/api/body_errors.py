"""What an error says about a request body: bounded, and with a code of its own.

A 422's `errors` and `detail` are bounded whatever the request held.

A request can hold as many problems as it has bytes: a 3.5 MB recipe with 300 000 unknown keys got
a 45.7 MB 422 when every problem was listed (and the names and values in those problems are the
client's own text, of any length). The first `MAX_LISTED_ISSUES` are listed, each location part
and message cut to a few hundred characters, and `detail` says how many more were left out: the
body stays a few KB, and what to fix first is still in it. Text is also made writable as UTF-8 (a
lone surrogate in a location would otherwise fail the response itself).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: How many problems a 422 lists.
MAX_LISTED_ISSUES = 20
#: How long each location part and message may be, in characters.
MAX_TEXT_CHARS = 200


def _clip(text: str) -> str:
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates as \udxxx
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 1] + "…"


def _location_part(part: Any) -> str | int:
    return part if isinstance(part, int) and not isinstance(part, bool) else _clip(str(part))


def bounded_issues(issues: Iterable[Mapping[str, Any]], total: int) -> tuple[list[dict[str, Any]], str]:
    """(`errors`, `detail`) of a 422 for `issues` (pydantic's, of which there are `total`): at most
    `MAX_LISTED_ISSUES` listed, and the detail naming how many were left out."""
    listed = []
    for issue in issues:
        if len(listed) == MAX_LISTED_ISSUES:
            break
        listed.append(
            {
                "loc": [_location_part(part) for part in issue.get("loc", ())],
                "msg": _clip(str(issue.get("msg", ""))),
                "type": _clip(str(issue.get("type", ""))),
            }
        )
    detail = "; ".join(f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in listed)
    if total > len(listed):
        detail += f"; and {total - len(listed)} more problems not listed (fix these and send it again)"
    return listed, detail


def unreadable_body(content_type: str, reason: str) -> tuple[str, str]:
    """(code, detail) of a 400 for a body the framework could not parse, `reason` its own words."""
    if content_type.lower().startswith("multipart/"):
        return "invalid_multipart", (
            f"the multipart body cannot be read ({_clip(reason)}): each part's header lines (a file "
            "name among them) must stay under 4 KB, with at most 8 headers a part"
        )
    return "invalid_json", (
        "the body cannot be read as JSON: it must be UTF-8, nested at most a few hundred levels deep"
    )
