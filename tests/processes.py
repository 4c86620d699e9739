"""Tessera services as real processes on loopback, for end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tessera.serving import is_serving

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Processes:
    tmp_path: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, module: str, *args: str) -> None:
        log = (self.tmp_path / f"{name}.log").open("wb")
        self.running[name] = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    async def wait_serving(self, name: str, port: int) -> None:
        for _ in range(300):
            process = self.running[name]
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode}: {self.log(name)}")
            if await is_serving(f"127.0.0.1:{port}", deadline=0.5):
                return
            await asyncio.sleep(0.05)
        pytest.fail(f"{name} never became healthy: {self.log(name)}")

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text()

    def stop(self, name: str) -> int:
        process = self.running.pop(name)
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=30)

    def kill(self, name: str) -> None:
        """SIGKILL: no graceful stop, no goodbye to clients."""
        process = self.running.pop(name)
        process.kill()
        process.wait()

    def kill_all(self) -> None:
        for process in self.running.values():
            process.kill()
            process.wait()
        self.running.clear()
