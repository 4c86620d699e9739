"""EBO's start-up rule: a valid local license first, else a network lease, else a clear
refusal (NoLicense, saying why for both), so the application can decide not to start.

Used through ``LicenseClient.license()`` / ``check_out()``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from clients.errors import LicenseError, NoLicense
from clients.license import EventCallback, License, LocalLicense

if TYPE_CHECKING:
    from clients.client import LicenseClient


async def check_out(
    client: LicenseClient,
    feature: str,
    count: int = 1,
    *,
    ttl: float | None = None,
    wait: float | None = None,
    on_event: EventCallback | None = None,
) -> License:
    """A local license of ``feature`` with ``count`` seats or more from the client's
    local license store (verified offline), else a network lease; NoLicense otherwise.
    The address was checked when the client was made, so a bad one never gets here."""
    problems: list[str] = []
    store = client.local_licenses
    if store is not None:
        found = await asyncio.to_thread(store.check, feature, client.vendor_keys)
        if found.certificate is not None and found.certificate.count >= count:
            return LocalLicense(found.certificate, count, on_event)
        if found.certificate is not None:
            problems.append(
                f"the local license has {found.certificate.count} seat(s), {count} needed"
            )
        problems += found.problems
    try:
        return await client.acquire(feature, count, ttl=ttl, wait=wait, on_event=on_event)
    except LicenseError as error:
        raise NoLicense(feature, problems, error) from error
