"""Prometheus / OpenMetrics exposition on a port of its own (``--metrics-listen``).

Each service keeps its metrics in its own ``CollectorRegistry`` (several services in one
test process never clash) and serves it at ``GET /metrics`` from a small asyncio HTTP
server: no thread, no web framework. A scrape sends OpenMetrics 1.0.0 when the Accept
header asks for ``application/openmetrics-text``, else the Prometheus text format 0.0.4.
Gauges that are read from the database are refreshed by the scrape itself, just before
the registry is written (``before_scrape``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
# A scrape request is one line and a few headers; anything larger is not Prometheus.
MAX_REQUEST_HEAD = 16 * 1024
READ_TIMEOUT = 10.0
REFRESH_TIMEOUT = 5.0

Refresh = Callable[[], Awaitable[None]]


def new_registry(service: str) -> CollectorRegistry:
    """A registry with the process's own metrics and ``tessera_build_info``."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    try:
        version = metadata.version("tessera")
    except metadata.PackageNotFoundError:  # pragma: no cover  (running from a checkout)
        version = "unknown"
    Info("tessera_build", "The Tessera service and version", registry=registry).info(
        {"service": service, "version": version}
    )
    return registry


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9100`` for IPv6) as (host, port); ValueError when it is not."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{listen!r} is not HOST:PORT")
    host = host.removeprefix("[").removesuffix("]")
    return host, int(port_text)


def metrics_note(listen: str, port: int | None) -> str:
    """'; metrics at http://host:port/metrics' for a start-up line, or '' when off."""
    if port is None:
        return ""
    host, _ = split_listen(listen)
    host = host or "0.0.0.0"
    if ":" in host:
        host = f"[{host}]"
    return f"; metrics at http://{host}:{port}{METRICS_PATH}"


class MetricsServer:
    """Serves one registry at GET /metrics on its own HTTP port."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.before_scrape: list[Refresh] = []
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self, listen: str) -> int:
        """Listen on ``host:port`` (port 0: any free port); returns the bound port."""
        host, port = split_listen(listen)
        self._server = await asyncio.start_server(
            self._serve, host or None, port, limit=MAX_REQUEST_HEAD
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):  # a scraper that never finishes asking
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def scrape(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its content type for an Accept header."""
        for refresh in self.before_scrape:
            try:
                await asyncio.wait_for(refresh(), REFRESH_TIMEOUT)
            except Exception:
                log.warning("refreshing metrics before a scrape failed", exc_info=True)
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            except (asyncio.IncompleteReadError, TimeoutError):
                return
            except asyncio.LimitOverrunError:
                await _respond(writer, 431, "Request Header Fields Too Large")
                return
            await self._answer(head, writer)
        except ConnectionError:
            pass
        finally:
            self._connections.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, head: bytes, writer: asyncio.StreamWriter) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await _respond(writer, 400, "Bad Request")
            return
        method, target, _ = parts
        if target.split("?", 1)[0] != METRICS_PATH:
            await _respond(writer, 404, "Not Found", b"metrics are at /metrics\n")
            return
        if method not in ("GET", "HEAD"):
            await _respond(writer, 405, "Method Not Allowed", headers={"Allow": "GET, HEAD"})
            return
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        body, content_type = await self.scrape(accept)
        await _respond(
            writer, 200, "OK", body, content_type=content_type, send_body=method == "GET"
        )


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    phrase: str,
    body: bytes = b"",
    *,
    content_type: str = "text/plain; charset=utf-8",
    headers: dict[str, str] | None = None,
    send_body: bool = True,
) -> None:
    fields = {
        "Content-Type": content_type,
        "Content-Length": str(len(body)),
        "Connection": "close",
        **(headers or {}),
    }
    head = f"HTTP/1.1 {status} {phrase}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    writer.write(head.encode("latin-1") + b"\r\n" + (body if send_body else b""))
    await writer.drain()
