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

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, get_args

from pydantic import BaseModel

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


#: Pydantic error types raised by our own validators whose type is the error's code (the 422's
#: `code` is then this instead of `validation_error`): a budget over its range (app.api.schemas).
SPECIFIC_CODES = ("budget_out_of_range",)


def validation_code(issues: Iterable[Mapping[str, Any]]) -> str:
    """The 422's code: a specific one when an issue is of a type in SPECIFIC_CODES."""
    types = {str(issue.get("type", "")) for issue in issues}
    return next((code for code in SPECIFIC_CODES if code in types), "validation_error")


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (through Annotated, unions, lists and dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def _fields_at(model: type[BaseModel], path: Sequence[Any]) -> list[str] | None:
    """The field names of the model found at `path` (field names; list indexes skipped) below `model`."""
    current: type[BaseModel] | None = model
    for part in path:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _model_in(field.annotation)
    return None if current is None else list(current.model_fields)


def with_suggestions(
    issues: list[Mapping[str, Any]], body: type[BaseModel] | None
) -> list[Mapping[str, Any]]:
    """`issues` with each unknown field's message saying "did you mean '<closest>'?" when a known
    field of the same object is close (difflib), or naming the known fields; at any nesting level.
    Only the listed ones are looked at (MAX_LISTED_ISSUES): a body with 300 000 unknown keys costs
    no more than one with 20."""
    if body is None:
        return issues
    out = list(issues)
    for index, issue in enumerate(out[:MAX_LISTED_ISSUES]):
        loc = tuple(issue.get("loc", ()))
        if issue.get("type") != "extra_forbidden" or len(loc) < 2 or loc[0] != "body":
            continue
        known = _fields_at(body, loc[1:-1])
        if not known:
            continue
        key = str(loc[-1])
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"the fields here are: {', '.join(known)}"
        out[index] = {**issue, "msg": f"unknown field '{_clip(key)}': {hint}"}
    return out


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
