"""``python -m services.administrator``: settings -> database -> serve until SIGTERM."""

from __future__ import annotations

import asyncio

from services.administrator.config import load_settings
from services.administrator.server import build
from tessera.serving import configure_logging, wait_for_stop_signal


async def main() -> None:
    settings = load_settings()
    configure_logging(settings.common.log_level)
    server = await build(settings)
    await wait_for_stop_signal()
    await server.stop(settings.common.shutdown_grace)


if __name__ == "__main__":
    asyncio.run(main())
