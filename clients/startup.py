"""EBO's start-up rule: a valid local license first, else a network lease, else a clear
refusal (NoLicense, saying why for both), so the application can decide not to start.

Used through ``LicenseClient.license()`` / ``check_out()``; the rule knows the local
license store and how to ask for a network lease, not the client, so the client depends
on it and never the reverse.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from nacl.signing import VerifyKey

from clients.errors import LicenseError, NoLicense
from clients.license import EventCallback, License, LocalLicense
from tessera.local_licenses import LocalLicenseStore

#: Takes the network lease when no local license serves (``LicenseClient.acquire``).
NetworkLease = Callable[[], Awaitable[License]]


async def check_out(
    local_licenses: LocalLicenseStore | None,
    vendor_keys: Mapping[str, VerifyKey],
    feature: str,
    count: int,
    network_lease: NetworkLease,
    on_event: EventCallback | None = None,
) -> License:
    """A local license of ``feature`` with ``count`` seats or more from ``local_licenses``
    (verified offline with ``vendor_keys``), else ``network_lease()``; NoLicense otherwise.
    The address was checked when the client was made, so a bad one never gets here."""
    problems: list[str] = []
    if local_licenses is not None:
        found = await asyncio.to_thread(local_licenses.check, feature, vendor_keys)
        if found.certificate is not None and found.certificate.count >= count:
            return LocalLicense(found.certificate, count, on_event)
        if found.certificate is not None:
            problems.append(
                f"the local license has {found.certificate.count} seat(s), {count} needed"
            )
        problems += found.problems
    try:
        return await network_lease()
    except LicenseError as error:
        raise NoLicense(feature, problems, error) from error
