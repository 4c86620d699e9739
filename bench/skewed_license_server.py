"""``python -m bench.skewed_license_server --clock-offset SECONDS ARGS``: the License
Server (``python -m services.license_server ARGS``) with its clock that many seconds off
(negative: behind), for a clock step in ``bench.history``.

It uses the service's own clock injection (``build(settings, clock)``; every time the
License Server reads goes through its ``tessera.clock.Clock``), not libfaketime: under
``LD_PRELOAD=libfaketime`` gRPC's and aiosqlite's timed waits made the server some 70
times slower under load on this machine, even with ``FAKETIME_FORCE_MONOTONIC_FIX``.
"""

from __future__ import annotations

import datetime as dt
import sys

from services.license_server.config import Settings, load_settings
from services.license_server.server import LicenseServer, build
from tessera.server.serving import run_service


class OffsetClock:
    """The wall clock, ``offset`` seconds off."""

    def __init__(self, offset: float) -> None:
        self.offset = dt.timedelta(seconds=offset)

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != "--clock-offset":
        sys.exit("usage: python -m bench.skewed_license_server --clock-offset SECONDS ARGS")
    clock = OffsetClock(float(argv[1]))
    rest = argv[2:]

    async def skewed(settings: Settings) -> LicenseServer:
        return await build(settings, clock=clock)

    run_service(lambda: load_settings(rest), skewed)


if __name__ == "__main__":
    main(sys.argv[1:])
