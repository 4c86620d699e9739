"""The terminal: colours only where they help, aligned tables, progress while waiting.

Colours go to a stream only when it is a terminal, ``NO_COLOR`` is unset or empty
(https://no-color.org), ``TERM`` is not ``dumb`` and ``--no-color`` was not given. The
progress indicator goes to stderr, only when stderr is a terminal and ``--json`` is off,
so pipes and scripts see nothing but the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO

_CODES = {
    "bold": "1",
    "dim": "2",
    "ok": "32",
    "warn": "33",
    "bad": "31",
    "accent": "36",
}


def wants_colour(stream: TextIO, environ: Mapping[str, str], disabled: bool) -> bool:
    if disabled or environ.get("NO_COLOR") or environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


class Style:
    """Paints text with ANSI colours, or leaves it alone."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def paint(self, text: str, tone: str) -> str:
        code = _CODES.get(tone)
        if not self.enabled or not code or not text:
            return text
        return f"\x1b[{code}m{text}\x1b[0m"

    def bold(self, text: str) -> str:
        return self.paint(text, "bold")

    def dim(self, text: str) -> str:
        return self.paint(text, "dim")

    def ok(self, text: str) -> str:
        return self.paint(text, "ok")

    def warn(self, text: str) -> str:
        return self.paint(text, "warn")

    def bad(self, text: str) -> str:
        return self.paint(text, "bad")

    def accent(self, text: str) -> str:
        return self.paint(text, "accent")


@dataclass(frozen=True)
class Cell:
    """A table cell with a tone (ok, warn, bad, dim, accent) applied after alignment."""

    text: str
    tone: str = ""


Row = Sequence["str | Cell"]


@dataclass(frozen=True)
class Column:
    title: str
    right: bool = False


def table(style: Style, columns: Sequence[Column], rows: Sequence[Row]) -> str:
    """Rows under upper-case headings, each column as wide as its widest cell."""
    cells = [[cell if isinstance(cell, Cell) else Cell(cell) for cell in row] for row in rows]
    widths = [len(column.title) for column in columns]
    for row in cells:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell.text))

    def line(parts: Sequence[Cell], heading: bool = False) -> str:
        out = []
        for index, (column, cell) in enumerate(zip(columns, parts, strict=True)):
            last = index == len(columns) - 1
            if column.right:
                text = cell.text.rjust(widths[index])
            else:
                text = cell.text if last else cell.text.ljust(widths[index])
            out.append(style.bold(text) if heading else style.paint(text, cell.tone))
        return "  ".join(out).rstrip()

    heading = line([Cell(column.title.upper()) for column in columns], heading=True)
    return "\n".join([heading, *(line(row) for row in cells)])


def pairs(style: Style, items: Sequence[tuple[str, str | Cell]], indent: str = "  ") -> str:
    """``key  value`` lines with the values aligned; empty values are left out."""
    shown = [
        (key, value if isinstance(value, Cell) else Cell(value))
        for key, value in items
        if (value.text if isinstance(value, Cell) else value)
    ]
    if not shown:
        return ""
    width = max(len(key) for key, _ in shown)
    return "\n".join(
        f"{indent}{style.dim(key.ljust(width))}  {style.paint(value.text, value.tone)}"
        for key, value in shown
    )


class Progress:
    """A spinner with the elapsed time on stderr while a call waits on the network."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
    ASCII_FRAMES = "|/-\\"

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        encoding = (getattr(stream, "encoding", "") or "").lower()
        self.frames = self.FRAMES if "utf" in encoding else self.ASCII_FRAMES

    @contextlib.asynccontextmanager
    async def show(self, message: str) -> AsyncIterator[None]:
        if not self.enabled:
            yield
            return
        task = asyncio.create_task(self._spin(message))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    async def _spin(self, message: str) -> None:
        started = time.monotonic()
        frame = 0
        while True:
            elapsed = int(time.monotonic() - started)
            suffix = f" ({elapsed} s)" if elapsed >= 2 else ""
            self.stream.write(f"\r{self.frames[frame % len(self.frames)]} {message}{suffix}\x1b[K")
            self.stream.flush()
            frame += 1
            await asyncio.sleep(0.1)
