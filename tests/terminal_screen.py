"""A command run in a pseudo-terminal of a given size, and what a terminal would show of it.

`run_in_terminal` gives the command a real pty (so `isatty()` is true and the window size is the
one set here), and returns every byte it wrote. `Screen` plays those bytes as a terminal would:
printable characters at the cursor, auto-wrap at the last column (counted: a line wider than the
terminal wraps, which is how a progress bar leaves a trail), carriage return, line feed, cursor
up, erase in line; colours and cursor visibility are ignored.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")
_OSC = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


def run_in_terminal(
    argv: Sequence[str],
    env: Mapping[str, str],
    columns: int = 80,
    rows: int = 24,
    timeout: float = 300,
    cwd: str | None = None,
) -> tuple[int, str]:
    """Run `argv` with stdin, stdout and stderr on a pty of `columns` × `rows`; its exit status
    and everything it wrote (decoded)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    clean = {key: value for key, value in env.items() if key not in ("COLUMNS", "LINES")}
    process = subprocess.Popen(
        list(argv),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**clean, "TERM": "xterm-256color"},
        cwd=cwd,
        start_new_session=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                process.kill()
                raise TimeoutError(f"{argv} still running after {timeout} s")
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
        status = process.wait(timeout=30)
    finally:
        os.close(master)
    return status, b"".join(chunks).decode("utf-8", errors="replace")


@dataclass
class Screen:
    """A terminal of `columns` columns and unbounded height, fed with `feed`."""

    columns: int
    lines: list[list[str]] = field(default_factory=lambda: [[]])
    row: int = 0
    col: int = 0
    pending_wrap: bool = False
    #: Times a character was written past the last column (the line went on in the next row).
    wraps: int = 0

    def _line(self) -> list[str]:
        while len(self.lines) <= self.row:
            self.lines.append([])
        return self.lines[self.row]

    def _put(self, char: str) -> None:
        if self.pending_wrap:
            self.wraps += 1
            self.row, self.col, self.pending_wrap = self.row + 1, 0, False
        line = self._line()
        while len(line) < self.col:
            line.append(" ")
        if self.col < len(line):
            line[self.col] = char
        else:
            line.append(char)
        if self.col == self.columns - 1:
            self.pending_wrap = True
        else:
            self.col += 1

    def _csi(self, params: str, command: str) -> None:
        number = int(params) if params.isdigit() else None
        if command == "A":
            self.row, self.pending_wrap = max(0, self.row - (number or 1)), False
        elif command == "K":
            line = self._line()
            if number == 2:
                line.clear()
            elif not number:
                del line[self.col :]
        elif command == "G":
            self.col, self.pending_wrap = (number or 1) - 1, False
        # m (colours), h/l (cursor visibility): nothing on the screen

    def feed(self, text: str) -> Screen:
        text = _OSC.sub("", text)
        position = 0
        while position < len(text):
            match = _CSI.match(text, position)
            if match:
                self._csi(match.group(1), match.group(2))
                position = match.end()
                continue
            char = text[position]
            position += 1
            if char == "\r":
                self.col, self.pending_wrap = 0, False
            elif char == "\n":
                self.row, self.pending_wrap = self.row + 1, False
                self._line()
            elif char == "\x1b" or char < " ":
                continue
            else:
                self._put(char)
        return self

    def text(self) -> list[str]:
        """The screen's lines, trailing blanks cut."""
        out = ["".join(line).rstrip() for line in self.lines]
        while out and not out[-1]:
            out.pop()
        return out
