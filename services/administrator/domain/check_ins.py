"""Check-in: the Administrator carries a License Server's signed check-in to the vendor
and the vendor's signed answer back.

A license line may carry a check-in policy (vendor's choice, off by default): its License
Servers must check in at least every so often, or its seats stop serving after a grace
period; a check-in that finds a certificate re-bound to another host (a copy of the
License Server repaired elsewhere) stops it serving at once. The Administrator checks in
each License Server it has worked with whenever one says a check-in is due, and on
demand (``tessera check-in``). Nothing is journaled: a check-in changes no seat count at
the vendor, and one cut short is simply made again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.administrator.domain import inputs
from services.administrator.domain.ports import (
    LICENSE_SERVER,
    JournalStore,
    LicenseServer,
    LicenseServerDirectory,
    Vendor,
)
from tessera.errors import DomainError, PeerUnavailable
from tessera.license.v1.license_pb2 import CheckInStatus

log = logging.getLogger("tessera.administrator.check_in")


@dataclass(frozen=True)
class CheckedIn:
    license_server: str
    host_id: str
    # Where the License Server stands afterwards.
    status: CheckInStatus
    # False when none was due (the periodic pass) and nothing was sent.
    checked_in: bool


class CheckIns:
    """Check License Servers in with the vendor."""

    def __init__(
        self,
        journal: JournalStore,
        activation_server: Vendor,
        license_servers: LicenseServerDirectory,
    ) -> None:
        self.journal = journal
        self.activation_server = activation_server
        self.license_servers = license_servers

    async def check_in(self, license_server: str) -> CheckedIn:
        """Check the License Server at ``license_server`` in now, due or not."""
        address = inputs.license_server(license_server)
        async with self.license_servers.connected(address) as server:
            return await self._check_in(server, only_if_due=False)

    async def check_in_due(self) -> list[CheckedIn]:
        """Check in every License Server the journal names whose licenses' policy makes a
        check-in due; one that does not answer is tried again at the next pass."""
        async with self.journal.transaction() as repo:
            addresses = await repo.license_server_addresses()
        done = []
        for address in addresses:
            try:
                async with self.license_servers.connected(address) as server:
                    checked = await self._check_in(server, only_if_due=True)
            except PeerUnavailable as error:
                if error.metadata.get("peer") != LICENSE_SERVER:
                    log.warning("check-in of the License Server at %s failed: %s", address, error)
                else:
                    # Often one moved away or retired: the journal keeps every address.
                    log.info("no check-in of the License Server at %s: %s", address, error)
                continue
            except DomainError as error:
                log.warning("check-in of the License Server at %s failed: %s", address, error)
                continue
            if checked.checked_in:
                done.append(checked)
                _log_status(checked)
        return done

    async def _check_in(self, server: LicenseServer, only_if_due: bool) -> CheckedIn:
        prepared = await server.prepare_check_in(only_if_due)
        if not prepared.request_id:
            return CheckedIn(server.address, server.host_id, prepared.status, checked_in=False)
        result = await self.activation_server.check_in(prepared.request)
        completed = await server.complete_check_in(result)
        return CheckedIn(server.address, server.host_id, completed.status, checked_in=True)


def _log_status(checked: CheckedIn) -> None:
    status = checked.status
    if status.superseded:
        log.error(
            "License Server %s (host %s) is superseded: the vendor re-bound its licenses to "
            "host %s; %d seat(s) stopped serving",
            checked.license_server,
            checked.host_id,
            status.superseded_by_host_id,
            status.withdrawn_seats,
        )
    elif status.withdrawn_seats:
        log.warning(
            "License Server %s (host %s) checked in; %d seat(s) do not serve",
            checked.license_server,
            checked.host_id,
            status.withdrawn_seats,
        )
    else:
        log.info("License Server %s (host %s) checked in", checked.license_server, checked.host_id)
