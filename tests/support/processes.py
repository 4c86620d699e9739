"""Tessera services as real processes on loopback, for end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from tessera.auth import BearerCredentials
from tessera.server.serving import is_serving
from tessera.tls import ClientTls
from tests.support.tokens import ADMINISTRATOR_TOKEN, OPERATOR_TOKEN

ROOT = Path(__file__).resolve().parents[2]

# Credentials every process started here gets through its environment (a flag a test
# gives still wins): the Administrator admits OPERATOR_TOKEN and presents
# ADMINISTRATOR_TOKEN to License Servers, which admit it.
CREDENTIALS_ENV = {
    "TESSERA_ADMIN_OPERATOR_TOKEN": OPERATOR_TOKEN,
    "TESSERA_ADMIN_LICENSE_SERVER_TOKEN": ADMINISTRATOR_TOKEN,
    "TESSERA_LS_ADMINISTRATOR_TOKEN": ADMINISTRATOR_TOKEN,
}


def credentialed_channel(target: str, token: str = OPERATOR_TOKEN) -> grpc.aio.Channel:
    """A channel whose calls present ``token`` unless they carry their own credential."""
    return grpc.aio.insecure_channel(target, interceptors=[BearerCredentials(lambda: token)])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Processes:
    tmp_path: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(
        self, name: str, module: str, *args: str, env: Mapping[str, str] | None = None
    ) -> None:
        """Start ``python -m module args``; ``env`` adds to (or overrides) the test's
        environment. A restart under the same name appends to the same log."""
        with (self.tmp_path / f"{name}.log").open("ab") as log:
            self.running[name] = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **CREDENTIALS_ENV, **(env or {})},
            )

    async def wait_serving(self, name: str, port: int, tls: ClientTls | None = None) -> None:
        """Wait until the process answers its health check (dialled with ``tls``)."""
        for _ in range(300):
            process = self.running[name]
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode}: {self.log(name)}")
            if await is_serving(f"127.0.0.1:{port}", deadline=0.5, tls=tls):
                return
            await asyncio.sleep(0.05)
        pytest.fail(f"{name} never became healthy: {self.log(name)}")

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text()

    def stop(self, name: str) -> int:
        process = self.running.pop(name)
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=30)

    async def wait_exit(self, name: str, within: float = 30) -> int:
        """Wait (at most ``within`` seconds) for a process to end by itself; its status
        (-9 when it was SIGKILLed, e.g. by a failpoint)."""
        process = self.running[name]
        try:
            status = await asyncio.to_thread(process.wait, within)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not exit within {within} s: {self.log(name)}")
        del self.running[name]
        return status

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
