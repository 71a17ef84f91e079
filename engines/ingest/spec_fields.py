"""The fields a stored dataset spec (image preprocessing, text tokenization) accepts from a user.

Both specs are frozen dataclasses read back from JSON: a value that is not an object, or a field
the dataclass does not have, is refused the same way for both, with the spec's own error code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any


def spec_values(spec: type, data: Any, what: str, refuse: Callable[[str], Exception]) -> dict[str, Any]:
    """`data` as keyword arguments of the dataclass `spec`; `refuse(detail)` is raised for a value
    that is not a JSON object or that names fields `spec` does not have (`what` names the spec)."""
    if not isinstance(data, Mapping):
        raise refuse(f"the {what} spec must be a JSON object; got {type(data).__name__}")
    known = [field.name for field in fields(spec)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise refuse(f"unknown {what} field(s) {unknown}; the fields are {known}")
    return dict(data)
