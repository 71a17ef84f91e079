"""The accuracy budget as people type it, read one way everywhere: `1%`, `1pt` and `0.01` are
one point of top-1 (or of fidelity); a bare number is a fraction, so `0.5` would be 50 points.

That last reading is the trap (`--budget 0.5` meant half a point), so a bare number above
`MAX_BARE_FRACTION` is refused with the probable reading instead of being sent."""

from __future__ import annotations

from optiforge_client.limits import MAX_BUDGET_DROP

#: The largest budget given as a bare fraction: 0.2 = 20 points. Above it a typo is far likelier
#: than a wish to lose a fifth of the accuracy; write `25pt` or `25%` to mean it.
MAX_BARE_FRACTION = 0.2
#: Suffixes that say "points" (percentage points of the metric).
POINT_SUFFIXES = ("%", "pt")
#: The suffix that makes the budget relative: `1%rel` is 1 % of the original's score.
RELATIVE_SUFFIX = "rel"


class BudgetError(ValueError):
    """A budget that cannot be read, or one that is probably misread; the message says which
    reading was probably meant (it names no flag: the caller adds `--budget`)."""


def _number(text: str, original: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BudgetError(
            f"{original!r} is not a budget: write points as 1% or 1pt, or a fraction as 0.01"
        ) from None
    if not value >= 0 or value == float("inf"):  # also refuses nan
        raise BudgetError(f"{original!r} is not a budget: a drop is a finite number of 0 or more")
    return value


def _within_servers(max_drop: float, original: str) -> float:
    """`max_drop`, unless it is over the most the server takes (limits.MAX_BUDGET_DROP)."""
    if max_drop > MAX_BUDGET_DROP:
        raise BudgetError(
            f"{original} allows a {max_drop * 100:g}-point drop; the server takes at most "
            f"{MAX_BUDGET_DROP * 100:g} points ({MAX_BUDGET_DROP * 100:g}%): for {max_drop:g} "
            f"point{'' if max_drop == 1 else 's'} write {max_drop:g}%"
        )
    return max_drop


def parse_budget(text: str) -> tuple[float, bool]:
    """`(max_drop, relative)` from `1%`, `1pt`, `0.01` (all one point: 0.01) or `1%rel` (1 % of
    the original's score). A bare number above MAX_BARE_FRACTION, or points over the server's
    MAX_BUDGET_DROP, raise BudgetError."""
    original = text
    spec = text.strip().lower()
    relative = spec.endswith(RELATIVE_SUFFIX)
    spec = spec.removesuffix(RELATIVE_SUFFIX).strip()
    for suffix in POINT_SUFFIXES:
        if spec.endswith(suffix):
            points = _number(spec.removesuffix(suffix).strip(), original)
            return _within_servers(points / 100.0, original), relative
    value = _number(spec, original)
    if value > MAX_BARE_FRACTION:
        rel = RELATIVE_SUFFIX if relative else ""
        meant = (
            f"{original} is a fraction, a {value * 100:g}-point drop; for {value:g} "
            f"point{'' if value == 1 else 's'} write {value:g}%{rel} "
            f"(or {value:g}pt{rel}, or {value / 100:g}{rel})"
        )
        if value <= MAX_BUDGET_DROP:  # the literal reading is one the server would take
            meant += f"; to allow {value * 100:g} points, write {value * 100:g}%{rel}"
        raise BudgetError(meant)
    return value, relative
