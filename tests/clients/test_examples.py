"""examples/workstation.py and examples/enterprise_server.py run as a user runs them.

Each example is a real process against a real vendor, License Server and Administrator
(in this process, on loopback), pointed at them with the flags its --help shows.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from tessera.auth import bearer_metadata
from tessera.license.v1 import license_pb2 as pb
from tests.support.in_process_site import Site
from tests.support.processes import ROOT
from tests.support.tokens import OPERATOR_TOKEN

pytestmark = pytest.mark.parametrize("databases", ["sqlite"], indirect=True)

DEMO_LINES = [("client.station", 10), ("server.enterprise.base", 1), ("server.device.es", 40)]


async def start(
    example: str, real_clock_site: Site, entitlement: str, *args: str
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, f"examples/{example}.py",
        "--address", real_clock_site.license_address,
        "--administrator", f"127.0.0.1:{real_clock_site.admin.port}",
        "--entitlement", entitlement,
        *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "TESSERA_ADMINISTRATOR_TOKEN": OPERATOR_TOKEN},
    )  # fmt: skip


async def run(example: str, real_clock_site: Site, entitlement: str, *args: str) -> tuple[int, str]:
    process = await start(example, real_clock_site, entitlement, *args)
    async with asyncio.timeout(60):
        output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


async def used(real_clock_site: Site) -> dict[str, tuple[int, int, int]]:
    reply = await real_clock_site.leases.GetLicenseInformation(pb.GetLicenseInformationRequest())
    return {f.feature: (f.activated, f.used, f.required) for f in reply.features}


async def test_the_workstation_activates_a_seat_holds_it_and_checks_it_in(
    real_clock_site: Site,
) -> None:
    entitlement = (await real_clock_site.create_entitlement(DEMO_LINES)).entitlement_id
    status, output = await run("workstation", real_clock_site, entitlement, "--seconds", "0.2")
    assert status == 0, output
    assert "Activated 2 x client.station" in output
    assert "WorkStation started for" in output and "on a network license" in output
    assert output.rstrip().endswith("Checked in.")
    assert (await used(real_clock_site))["client.station"] == (2, 0, 0)


async def test_the_workstation_refuses_to_start_without_a_license(real_clock_site: Site) -> None:
    status, output = await run("workstation", real_clock_site, "", "--no-activate")
    assert status == 1, output
    assert "The WorkStation does not start: no client.station license" in output
    assert "FEATURE_NOT_LICENSED" in output


async def test_the_enterprise_server_declares_holds_and_raises_the_alarm(
    real_clock_site: Site,
) -> None:
    entitlement = (await real_clock_site.create_entitlement(DEMO_LINES)).entitlement_id
    process = await start("enterprise_server", real_clock_site, entitlement, "--devices", "40")
    assert process.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(60):
        while not (line := (await process.stdout.readline()).decode()).startswith(
            "  40 x server.device.es"
        ):
            assert line, "".join(lines)
            lines.append(line)
    assert "Activated 1 x server.enterprise.base" in "".join(lines)
    books = await used(real_clock_site)
    assert books["server.device.es"] == (40, 40, 40)  # activated, used, required
    assert books["server.enterprise.base"] == (1, 1, 1)

    lease_id = line.split("lease ")[1].rstrip(")\n")
    await real_clock_site.lease_admin.RevokeLease(
        pb.RevokeLeaseRequest(lease_id=lease_id, reason="test"),
        metadata=bearer_metadata(OPERATOR_TOKEN),
    )
    async with asyncio.timeout(60):
        rest, _ = await process.communicate()
    assert process.returncode == 3, rest.decode()
    assert "ALARM: license lost: server.device.es: REVOKED_BY_OPERATOR" in rest.decode()
    assert (await used(real_clock_site))["server.enterprise.base"] == (1, 0, 1)  # checked in
