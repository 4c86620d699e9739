"""What a command gets (the session) and gives back (a result)."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tessera_cli.connections import Connections
from tessera_cli.failures import ExitCode
from tessera_cli.records import Json
from tessera_cli.settings import Settings
from tessera_cli.terminal import Progress, Style


@dataclass
class Session:
    """Everything a command needs besides its own arguments."""

    settings: Settings
    connections: Connections
    style: Style
    progress: Progress
    json: bool
    cwd: Path
    stdout: TextIO

    def path(self, text: str) -> Path:
        """A path the user typed, relative to the working directory."""
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.cwd / path


@dataclass(frozen=True)
class Result:
    """A command's answer: ``data`` for --json, ``text`` for people, and the exit code."""

    data: Json
    text: str
    exit_code: ExitCode = ExitCode.OK


Command = Callable[[argparse.Namespace, Session], Awaitable[Result]]
