"""Tables that fit the terminal: columns dropped by priority, then rows stacked.

A 16-column report at 80 columns wraps every cell into noise. Each column here has a priority:
the widest table of the most important columns that fits the width is drawn (the dropped ones
are counted under it, with where to read them), and when even the first columns do not fit, each
row is printed as a short block of `column: value` lines instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from optiforge_client.terminal import plain

#: The narrowest a flexible column (a label, a reason) is drawn before columns are dropped.
FLEX_MIN_WIDTH = 14
#: Blank cells between two columns.
GAP = 2


@dataclass(frozen=True)
class Column:
    """A column: `header`, its cell from a row (`cell`), `priority` (1 first, higher dropped
    first), `flexible` (long text cut with … rather than taking the whole width), `right`
    (numbers)."""

    header: str
    cell: Callable[[dict[str, Any]], str]
    priority: int = 1
    flexible: bool = False
    right: bool = False


def _width(text: str) -> int:
    return Text(text).cell_len


def _naturals(columns: Sequence[Column], cells: list[list[str]]) -> list[int]:
    return [
        max([_width(column.header)] + [_width(row[index]) for row in cells])
        for index, column in enumerate(columns)
    ]


def _floor(column: Column, natural: int, first: int, whole_first: bool) -> int:
    """The narrowest `column` may be drawn: a rigid one its widest cell; a flexible one of the
    first priority, with `whole_first`, its widest cell too (the candidate's name is what the row
    is about); another flexible one FLEX_MIN_WIDTH (or less, when its cells are shorter)."""
    if not column.flexible or (whole_first and column.priority == first):
        return natural
    return min(natural, FLEX_MIN_WIDTH)


def _needed(columns: Sequence[Column], cells: list[list[str]], first: int, whole_first: bool) -> int:
    """Cells the table needs with each column at its floor, the gaps between them included."""
    naturals = _naturals(columns, cells)
    floors = [
        _floor(column, natural, first, whole_first) for column, natural in zip(columns, naturals, strict=True)
    ]
    return sum(floors) + GAP * (len(columns) - 1)


def _widths(columns: Sequence[Column], cells: list[list[str]], width: int) -> list[int]:
    """Each column's width: the rigid ones their widest cell; what is left goes to the flexible
    ones in priority order (each at most its widest cell, the later ones keeping their floor),
    so that rich never has to squeeze the numbers."""
    naturals = _naturals(columns, cells)
    rigid = sum(natural for column, natural in zip(columns, naturals, strict=True) if not column.flexible)
    flexible = sorted(
        (index for index, column in enumerate(columns) if column.flexible), key=lambda i: columns[i].priority
    )
    left = width - rigid - GAP * (len(columns) - 1)
    widths = list(naturals)
    for position, index in enumerate(flexible):
        reserved = sum(min(naturals[later], FLEX_MIN_WIDTH) for later in flexible[position + 1 :])
        floor = min(naturals[index], FLEX_MIN_WIDTH)
        widths[index] = max(floor, min(naturals[index], left - reserved))
        left -= widths[index]
    return widths


def _table(columns: Sequence[Column], cells: list[list[str]], title: str | None, width: int) -> Table:
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, GAP // 2),
        title=title,
        title_justify="left",
        collapse_padding=True,
    )
    for column, size in zip(columns, _widths(columns, cells, width), strict=True):
        table.add_column(
            column.header,
            justify="right" if column.right else "left",
            no_wrap=True,
            overflow="ellipsis",
            min_width=size,
            max_width=size,
        )
    for row in cells:
        table.add_row(*row)
    return table


def _stacked(columns: Sequence[Column], cells: list[list[str]], title: str | None) -> Group:
    """Each row as `header: value` lines, each cut to the width: for a terminal too narrow for
    even the first columns side by side."""
    parts: list[RenderableType] = [Text(title, no_wrap=True, overflow="ellipsis")] if title else []
    for row in cells:
        first, *rest = zip(columns, row, strict=True)
        parts.append(Text(f"{first[0].header}: {first[1]}", no_wrap=True, overflow="ellipsis", style="bold"))
        parts += [
            Text(f"  {column.header}: {value}", no_wrap=True, overflow="ellipsis") for column, value in rest
        ]
    return Group(*parts)


def fitted(
    rows: Sequence[dict[str, Any]], columns: Sequence[Column], width: int, title: str | None = None
) -> tuple[RenderableType, list[str]]:
    """The table of `rows` that fits `width` cells, and the headers of the columns left out: the
    most columns with the first-priority labels whole; else the first-priority columns alone,
    labels cut with …; else every row stacked."""
    cells_of = {column: [plain(column.cell(row)) for row in rows] for column in columns}
    title = plain(title) if title else None
    first = min(column.priority for column in columns)

    def cells(kept: Sequence[Column]) -> list[list[str]]:
        return [[cells_of[column][i] for column in kept] for i in range(len(rows))]

    def chosen(kept: list[Column]) -> tuple[RenderableType, list[str]]:
        dropped = [column.header for column in columns if column not in kept]
        return _table(kept, cells(kept), title, width), dropped

    for priority in sorted({column.priority for column in columns}, reverse=True):
        kept = [column for column in columns if column.priority <= priority]
        if _needed(kept, cells(kept), first, whole_first=True) <= width:
            return chosen(kept)
    kept = [column for column in columns if column.priority == first]
    if _needed(kept, cells(kept), first, whole_first=False) <= width:
        return chosen(kept)
    return _stacked(kept, cells(kept), title), []


def print_fitted(
    console: Console,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[Column],
    title: str | None = None,
    more: str | None = None,
) -> None:
    """Print the table that fits `console`'s width; the columns left out are counted, with `more`
    (where to read them all, e.g. "--format md")."""
    table, dropped = fitted(rows, columns, console.width, title)
    console.print(table, crop=True)
    if dropped:
        note = f"({len(dropped)} more column{'s' if len(dropped) > 1 else ''} at a wider terminal"
        note += (f"; {more}" if more else "") + ")"
        console.print(Text(note, style="dim"))
