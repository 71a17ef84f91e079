"""Is this stream a terminal, and a rich console for one; text made safe to print on either.

Everything the CLI prints of the server's (messages, names, labels) goes through `plain`: a
model's name may hold an escape sequence or `[markup]`, and neither may reach a terminal as such.
"""

from __future__ import annotations

import os
import re
from typing import IO, Any

from rich.console import Console

#: Control characters (C0, DEL, C1): a model's name inside a message must not move a cursor.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def plain(text: str) -> str:
    """`text` on one line with no control character (each becomes a space)."""
    return _CONTROL.sub(" ", text)


def is_terminal(stream: IO[str] | Any) -> bool:
    """True when `stream` is an interactive terminal that understands control sequences."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"
    except ValueError:  # a closed stream
        return False


def terminal_console(stream: IO[str]) -> Console:
    """A rich console on `stream`, a terminal: its width is the terminal's. No markup, no
    highlighting, no emoji codes: strings are printed as they are."""
    return Console(
        file=stream, force_terminal=True, markup=False, highlight=False, emoji=False, soft_wrap=False
    )
