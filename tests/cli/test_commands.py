"""The ``tessera`` CLI against real in-process services, on SQLite and on PostgreSQL.

The CLI runs in the test's event loop (``App.run``) with its own environment, working
directory and captured streams, next to a real Activation Server, License Server and
Administrator (tests/support/in_process_site.py). Checked: what each subcommand does, the
--json shapes, the exit codes, and what the main refusals tell the operator.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.administrator.domain.offline_files import RESPONSE, armour, read_response_file
from tessera.license.v1 import license_pb2
from tessera_cli.app import App
from tests.support.databases import DatabaseFactory
from tests.support.in_process_site import (
    Site,
    restart_activation_server,
    restart_administrator,
    restart_license_server,
    start_another_license_server,
)
from tests.support.processes import free_port
from tests.support.tokens import OPERATOR_TOKEN, VENDOR_TOKEN

OPERATION_KEYS = {
    "operation_id",
    "kind",
    "state",
    "license_server",
    "host_id",
    "activation_id",
    "certificate_id",
    "count",
    "offline",
    "target_license_server",
    "target_host_id",
    "request_id",
    "last_error",
    "created_at",
    "updated_at",
}
CERTIFICATE_KEYS = {
    "certificate_id",
    "feature",
    "count",
    "kind",
    "entitlement_id",
    "activation_id",
    "host_id",
    "customer_organization",
    "revision",
    "partial_return_allowed",
    "issued_at",
    "expires_at",
    "maintenance_ends_at",
    "installed_at",
}
ERROR_KEYS = {"message", "hint", "code", "reason", "metadata", "service", "exit_code"}


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)


class Cli:
    """``tessera`` pointed at a Site through the environment, as an operator would."""

    def __init__(self, real_clock_site: Site, tmp_path: Path) -> None:
        self.cwd = tmp_path / "operator"
        self.cwd.mkdir(exist_ok=True)
        self.env = {
            "TESSERA_ADMINISTRATOR": f"127.0.0.1:{real_clock_site.admin.port}",
            "TESSERA_LICENSE_SERVER": real_clock_site.license_address,
            "TESSERA_ACTIVATION_SERVER": f"127.0.0.1:{real_clock_site.activation.port}",
            "TESSERA_ADMINISTRATOR_TOKEN": OPERATOR_TOKEN,
            "TESSERA_OPERATOR_TOKEN": OPERATOR_TOKEN,
            "TESSERA_VENDOR_TOKEN": VENDOR_TOKEN,
            "TESSERA_TIMEOUT": "20",
            "XDG_CONFIG_HOME": str(tmp_path / "no-config"),
        }
        self.site = real_clock_site

    def point_at(self, real_clock_site: Site) -> None:
        self.env["TESSERA_ADMINISTRATOR"] = f"127.0.0.1:{real_clock_site.admin.port}"
        self.env["TESSERA_ACTIVATION_SERVER"] = f"127.0.0.1:{real_clock_site.activation.port}"

    async def __call__(self, *argv: str, env: dict[str, str] | None = None) -> Run:
        stdout, stderr = io.StringIO(), io.StringIO()
        app = App(
            environ={**self.env, **(env or {})},
            cwd=self.cwd,
            stdout=stdout,
            stderr=stderr,
            home=self.cwd,
        )
        code = await app.run(list(argv))
        return Run(code, stdout.getvalue(), stderr.getvalue())

    async def ok(self, *argv: str) -> Run:
        run = await self(*argv)
        assert run.code == 0, (argv, run)
        return run

    async def json(self, *argv: str) -> Any:
        return (await self.ok(*argv, "--json")).json

    async def refused(self, code: int, reason: str, *argv: str) -> dict[str, Any]:
        """Run with --json, expect the exit code and reason; also check the words."""
        run = await self(*argv, "--json")
        assert run.code == code, (argv, run)
        error = run.json["error"]
        assert set(error) == ERROR_KEYS
        assert (error["reason"], error["exit_code"]) == (reason, code), error
        human = await self(*argv)
        assert human.code == code and human.stdout == ""
        words = " ".join(human.stderr.split())  # wrapped to the terminal's width
        assert words.startswith("error: ") and error["message"] in words
        assert " ".join(error["hint"].split()) in words
        return dict(error)


@pytest.fixture
def cli(real_clock_site: Site, tmp_path: Path) -> Cli:
    return Cli(real_clock_site, tmp_path)


async def create_order(cli: Cli, *lines: str) -> dict[str, Any]:
    args = [arg for line in lines for arg in ("--line", line)]
    created = await cli.json(
        "vendor", "entitlements", "create", "--customer", "Harbour Tower", *args
    )
    return dict(created["entitlement"])


async def lease(real_clock_site: Site, feature: str = "client.station") -> Any:
    """A WorkStation holding a seat over a stream (kept open by the caller)."""
    stream = real_clock_site.leases.Lease()
    await stream.write(
        license_pb2.LeaseRequest(
            acquire=license_pb2.LeaseAcquire(
                feature=feature, count=1, client_host="ws-07", user="alice"
            )
        )
    )
    granted = await stream.read()
    assert granted.HasField("granted")
    return stream


async def test_order_activate_licenses_return_and_journal(cli: Cli) -> None:
    order = await create_order(cli, "client.station=10", "server.device.es=40,partial")
    ent = order["entitlement_id"]
    assert [line["feature"] for line in order["lines"]] == ["client.station", "server.device.es"]

    shown = await cli.ok("order", ent)
    assert "ACTIVATION ID" in shown.stdout and order["lines"][0]["activation_id"] in shown.stdout
    assert "\x1b[" not in shown.stdout  # not a terminal: no colours

    registered = await cli.json(
        "registration", "set", "--organization", "Harbour Tower", "--email", "bms@harbour.example"
    )
    assert registered["registration"]["organization"] == "Harbour Tower"
    kept = await cli.json("registration", "set", "--site", "Plant room")
    assert kept["registration"] == {
        "organization": "Harbour Tower",
        "contact_name": "",
        "email": "bms@harbour.example",
        "phone": "",
        "site": "Plant room",
    }

    activated = await cli.json("activate", ent, "--feature", "client.station", "--count", "2")
    assert set(activated["operation"]) == OPERATION_KEYS
    assert set(activated["certificate"]) == CERTIFICATE_KEYS
    assert activated["operation"]["state"] == "completed"
    assert (activated["certificate"]["feature"], activated["certificate"]["count"]) == (
        "client.station",
        2,
    )
    by_line = await cli.ok("activate", order["lines"][1]["activation_id"], "--count", "40")
    assert by_line.stdout.startswith("Activated 40 x server.device.es onto ")

    licenses = await cli.json("licenses")
    assert licenses["features"] == [
        {
            "feature": "client.station",
            "activated": 2,
            "used": 0,
            "available": 2,
            "queued": 0,
            "required": 0,
            "violation": False,
            "withdrawn": 0,
            "withdrawn_reason": "",
        },
        {
            "feature": "server.device.es",
            "activated": 40,
            "used": 0,
            "available": 40,
            "queued": 0,
            "required": 0,
            "violation": False,
            "withdrawn": 0,
            "withdrawn_reason": "",
        },
    ]
    assert {c["feature"] for c in licenses["certificates"]} == {
        "client.station",
        "server.device.es",
    }
    table = (await cli.ok("licenses")).stdout
    assert "FEATURE" in table and "ACTIVATED" in table and "VIOLATION" in table

    trust = await cli.json("trust")
    assert trust["health"]["healthy"] is True and trust["health"]["serving_seats"] == 42

    # A partial return of the per-seat line, by a prefix of the certificate id.
    device_certificate = next(
        c["certificate_id"] for c in licenses["certificates"] if c["feature"] == "server.device.es"
    )
    partial = await cli.json("return", device_certificate[:8], "--count", "10")
    assert partial["remaining"]["count"] == 30 and partial["revoked_leases"] == 0
    returned = await cli.json("return", "--feature", "client.station")
    assert returned["operation"]["kind"] == "return"
    assert returned["remaining"] is None
    features = {f["feature"]: f["activated"] for f in (await cli.json("licenses"))["features"]}
    assert features == {"client.station": 0, "server.device.es": 30}

    journal = await cli.json("operations")
    assert [op["kind"] for op in journal["operations"]] == [
        "return",
        "return",
        "activate",
        "activate",
    ]
    first = journal["operations"][-1]["operation_id"]
    shown_op = await cli.json("operations", "show", first[:8])
    assert shown_op["operation"]["operation_id"] == first
    assert "completed" in (await cli.ok("operations")).stdout


async def test_leases_revoke_and_a_return_refused_while_seats_are_in_use(
    cli: Cli, real_clock_site: Site
) -> None:
    order = await create_order(cli, "client.station=5")
    await cli.ok("activate", order["entitlement_id"], "--count", "1")
    holder = await lease(real_clock_site)

    leases = (await cli.json("leases"))["leases"]
    assert [(e["state"], e["client_host"], e["user"]) for e in leases] == [
        ("held", "ws-07", "alice")
    ]
    assert "ws-07" in (await cli.ok("leases")).stdout

    error = await cli.refused(1, "SEATS_IN_USE", "return", "--feature", "client.station")
    assert error["code"] == "FAILED_PRECONDITION"
    assert "--force" in error["hint"]

    revoked = await cli.json("revoke", leases[0]["lease_id"][:8], "--reason", "replaced")
    assert revoked == {"lease_id": leases[0]["lease_id"], "revoked": True}
    told = await holder.read()
    assert told.revoked.reason == "REVOKED_BY_OPERATOR"
    again = await cli.ok("revoke", leases[0]["lease_id"])
    assert "already ended" in again.stdout

    await lease(real_clock_site)
    forced = await cli.json("return", "--feature", "client.station", "--force")
    assert forced["revoked_leases"] == 1

    missing = await cli("leases", env={"TESSERA_OPERATOR_TOKEN": ""})
    assert missing.code == 4 and "operator token" in missing.stderr
    (cli.cwd / "wrong-token").write_text("nope\n")
    wrong = await cli.refused(
        4, "CREDENTIAL_INVALID", "leases", "--operator-token-file", "wrong-token"
    )
    assert "TESSERA_OPERATOR_TOKEN" in wrong["hint"]


async def test_trust_broken_repair_limit_and_repair(cli: Cli, real_clock_site: Site) -> None:
    order = await create_order(cli, "client.station=5")
    await cli.ok("activate", order["entitlement_id"], "--count", "2")
    # Healthy: refused, and (below) not counted against the year's one repair.
    for _ in range(2):
        healthy = await cli.refused(1, "NOTHING_TO_REPAIR", "repair")
        assert "tessera repair --force" in healthy["hint"]
    await restart_license_server(real_clock_site, machine_id="replacement-board")

    broken = await cli("trust", "--json")
    assert broken.code == 5
    health = broken.json["health"]
    assert health["healthy"] is False and health["broken_seats"] == 2
    assert health["repair_advice"]
    assert {c["state"] for c in health["certificates"]} == {"broken"}
    words = await cli("trust")
    assert words.code == 5 and "BROKEN" in words.stdout and "tessera repair" in words.stdout

    error = await cli.refused(1, "TRUSTED_STORAGE_BROKEN", "return", "--feature", "client.station")
    assert "tessera repair" in error["hint"]

    await restart_activation_server(real_clock_site, "--max-repairs-per-year", "1")
    cli.point_at(real_clock_site)
    repaired = await cli.json("repair")
    assert repaired["operation"]["state"] == "completed"
    assert repaired["health"]["healthy"] is True
    assert (await cli("trust")).code == 0

    # Broken again on yet another machine: the one repair of the year is used up.
    await restart_license_server(real_clock_site, machine_id="third-board")
    error = await cli.refused(1, "REPAIR_LIMIT_REACHED", "repair")
    next_allowed = error["metadata"]["next_allowed_at"]
    assert f"next repair of this License Server from {next_allowed[:10]}" in error["hint"]


async def test_a_repair_on_a_new_host_key_is_refused_and_loses_nothing(
    cli: Cli, real_clock_site: Site
) -> None:
    order = await create_order(cli, "client.station=5")
    await cli.ok("activate", order["entitlement_id"], "--count", "2")
    first_host = real_clock_site.license.identity.host_id
    key = real_clock_site.tmp_path / "license_server" / "host.key"
    lost = key.rename(key.with_name("host.key.lost"))
    # The database as it was, on a new host key (the License Server creates one).
    await restart_license_server(real_clock_site, machine_id="test-machine")
    assert real_clock_site.license.identity.host_id != first_host
    broken = await cli("trust", "--json")
    assert broken.code == 5 and broken.json["health"]["broken_seats"] == 2
    assert "REPAIR_FROM_ANOTHER_HOST" in broken.json["health"]["repair_advice"]

    error = await cli.refused(1, "REPAIR_FROM_ANOTHER_HOST", "repair")
    assert first_host in error["message"] and "host.key" in error["message"]
    assert "force-return" in error["hint"] and first_host in error["hint"]
    # Nothing changed: trusted storage keeps the certificates, no repair was journaled
    # or counted at the vendor, which still records the seats on the first host.
    after = await cli("trust", "--json")
    assert after.code == 5 and after.json["health"]["broken_seats"] == 2
    assert [op["kind"] for op in (await cli.json("operations"))["operations"]] == ["activate"]
    audit = await cli.json("vendor", "audit")
    assert not [entry for entry in audit["entries"] if entry["action"].startswith("repair.")]

    # The way out the message names: the host key back, and nothing needs repairing.
    lost.replace(key)
    await restart_license_server(real_clock_site, machine_id="test-machine")
    assert real_clock_site.license.identity.host_id == first_host
    assert (await cli("trust")).code == 0
    assert (await cli.json("licenses"))["features"][0]["activated"] == 2


async def test_offline_request_submit_import(cli: Cli) -> None:
    order = await create_order(cli, "client.station=5")
    exported = await cli.json(
        "export-request", "activate", order["entitlement_id"], "--count", "3", "-o", "req.txt"
    )
    request_file = cli.cwd / "req.txt"
    assert exported["file"] == "req.txt" and exported["bytes"] == len(request_file.read_bytes())
    assert request_file.read_bytes().startswith(b"-----BEGIN TESSERA REQUEST-----")
    assert exported["operation"]["state"] == "prepared" and exported["operation"]["offline"]

    again = await cli("export-request", "activate", order["entitlement_id"], "-o", "req.txt")
    assert again.code == 2 and "--overwrite" in again.stderr

    words = await cli.ok("submit", "req.txt")
    [response_name] = [p.name for p in cli.cwd.glob("*-response.txt")]
    assert f"tessera import-response {response_name}" in words.stdout

    await cli.refused(2, "WRONG_FILE_TYPE", "submit", response_name, "-o", "x.txt")

    imported = await cli.json("import-response", response_name)
    assert imported["operation"]["state"] == "completed"
    assert (await cli.json("licenses"))["features"][0]["activated"] == 3
    assert (await cli.json("import-response", response_name))["operation"]["state"] == ("completed")

    # Trusted storage is healthy: a repair request is written only when forced.
    await cli.refused(1, "NOTHING_TO_REPAIR", "export-request", "repair", "-o", str(cli.cwd))
    assert not list(cli.cwd.glob("tessera-repair-*"))
    repair_request = await cli.json("export-request", "repair", "--force", "-o", str(cli.cwd))
    assert Path(repair_request["file"]).name.endswith("-request.txt")

    piped = await cli("export-request", "repair", "--force", "-o", "-")
    assert piped.code == 0 and piped.stdout.startswith("-----BEGIN TESSERA REQUEST-----")

    missing = await cli("submit", "no-such-file.txt")
    assert missing.code == 2 and "no-such-file.txt" in missing.stderr


async def test_a_forged_answer_file_is_refused_and_the_genuine_one_completes(cli: Cli) -> None:
    order = await create_order(cli, "client.station=5")
    await cli.ok("export-request", "activate", order["entitlement_id"], "-o", "req.txt")
    await cli.ok("submit", "req.txt", "-o", "resp.txt")
    # The vendor's signature altered by one bit, the file's checksum made to match.
    file = read_response_file((cli.cwd / "resp.txt").read_bytes())
    file.response.signature = bytes([file.response.signature[0] ^ 1]) + file.response.signature[1:]
    (cli.cwd / "forged.txt").write_bytes(armour(RESPONSE, file.SerializeToString(), []))

    error = await cli.refused(1, "BAD_SIGNATURE", "import-response", "forged.txt")
    assert "submit" in error["hint"]
    [operation] = (await cli.json("operations"))["operations"]
    assert (operation["state"], operation["last_error"]) == ("prepared", "")
    assert (await cli.json("licenses"))["features"] == []

    imported = await cli.json("import-response", "resp.txt")
    assert imported["operation"]["state"] == "completed"
    assert (await cli.json("licenses"))["features"][0]["activated"] == 1


async def test_an_imported_answer_is_refused_on_another_license_server(
    cli: Cli, real_clock_site: Site, databases: DatabaseFactory
) -> None:
    other = await start_another_license_server(real_clock_site, databases, "ls-b", "machine-b")
    try:
        order = await create_order(cli, "client.station=5")
        await cli.ok("export-request", "activate", order["entitlement_id"], "-o", "req.txt")
        await cli.ok("submit", "req.txt", "-o", "resp.txt")
        other_address = f"{other.port}@127.0.0.1"
        # Before the install and after it: never "completed" on another License Server.
        for _ in ("before", "after"):
            error = await cli.refused(
                1,
                "CERTIFICATE_FOR_ANOTHER_HOST",
                "import-response",
                "resp.txt",
                "--license-server",
                other_address,
            )
            assert other.identity.host_id in error["message"]
            assert real_clock_site.license.identity.host_id in error["hint"]
            there = await cli.json("licenses", "--license-server", other_address)
            assert there["features"] == []
            imported = await cli.json("import-response", "resp.txt")
            assert imported["operation"]["state"] == "completed"
    finally:
        await other.stop(0)


async def test_move_to_another_license_server(
    cli: Cli, real_clock_site: Site, databases: DatabaseFactory
) -> None:
    other = await start_another_license_server(real_clock_site, databases, "ls-b", "machine-b")
    try:
        order = await create_order(cli, "server.enterprise.base=1")
        await cli.ok("activate", order["entitlement_id"])
        target = f"{other.port}@127.0.0.1"
        moved = await cli.json("move", "--feature", "server.enterprise.base", "--to", target)
        assert moved["operation"]["kind"] == "move"
        assert moved["operation"]["target_license_server"] == target
        assert moved["certificate"]["host_id"] == other.identity.host_id
        assert (await cli.json("licenses"))["features"][0]["activated"] == 0
        there = await cli.json("licenses", "--license-server", target)
        assert there["features"][0]["activated"] == 1

        same = await cli.refused(
            2,
            "SAME_LICENSE_SERVER",
            "move",
            moved["certificate"]["certificate_id"],
            "--from",
            target,
            "--to",
            target,
        )
        assert "--to" in same["hint"]
    finally:
        await other.stop(0)


async def test_vendor_staff_commands(cli: Cli) -> None:
    order = await create_order(cli, "client.station=4", "client.script=2,local,days=30")
    ent = order["entitlement_id"]
    assert order["lines"][1]["kind"] == "local"
    assert order["lines"][1]["duration_seconds"] == 30 * 86400
    shown = await cli.json("vendor", "entitlements", "show", ent)
    assert shown["entitlement"]["entitlement_id"] == ent

    activated = await cli.json("activate", ent, "--feature", "client.station", "--count", "2")
    certificate_id = activated["certificate"]["certificate_id"]
    listed = await cli.json("vendor", "activations", "--entitlement", ent)
    assert [(a["certificate_id"], a["state"]) for a in listed["activations"]] == [
        (certificate_id, "active")
    ]

    forced = await cli.json(
        "vendor", "force-return", certificate_id[:8], "--reason", "server destroyed, ticket 4411"
    )
    assert forced["activation"]["state"] == "force_returned"
    no_reason = await cli("vendor", "force-return", certificate_id, "--reason", " ")
    assert no_reason.code == 2

    audit = await cli.json("vendor", "audit", "--all")
    actions = [entry["action"] for entry in audit["entries"]]
    assert "activation.granted" in actions and audit["head_sequence"] == len(actions)
    assert isinstance(audit["entries"][0]["detail"], dict)
    page = await cli.json("vendor", "audit", "list", "--limit", "1")
    assert len(page["entries"]) == 1 and page["next_after_sequence"] == 1
    verified = await cli.json("vendor", "audit", "verify")
    assert verified["intact"] is True and verified["entries_checked"] == len(actions)

    keys = (await cli.json("vendor", "keys"))["keys"]
    rotated = await cli.json("vendor", "keys", "rotate")
    assert rotated["key"]["active"] and rotated["key"]["key_id"] != keys[0]["key_id"]
    published = (await cli.ok("vendor", "keys", "list", "--pub")).stdout
    assert all(k["public_key"] in published for k in rotated["keys"])

    no_token = await cli("vendor", "activations", "--json", env={"TESSERA_VENDOR_TOKEN": ""})
    assert no_token.code == 4 and no_token.json["error"]["reason"] == "CREDENTIAL_MISSING"
    bad = await cli("vendor", "activations", "--json", env={"TESSERA_VENDOR_TOKEN": "nope"})
    assert bad.code == 4 and bad.json["error"]["reason"] == "CREDENTIAL_INVALID"
    line = await cli("vendor", "entitlements", "create", "--customer", "X", "--line", "client")
    assert line.code == 2 and "FEATURE=COUNT" in line.stderr


async def test_what_refusals_and_outages_tell_the_operator(cli: Cli, real_clock_site: Site) -> None:
    order = await create_order(cli, "client.station=2")
    ent = order["entitlement_id"]

    typo = ent[:-1] + ("0" if ent[-1] != "0" else "1")
    error = await cli.refused(2, "INVALID_INPUT", "order", typo)
    assert "check character" in error["hint"]

    error = await cli.refused(
        1, "NOT_ENOUGH_SEATS_LEFT", "activate", ent, "--feature", "client.station", "--count", "3"
    )
    assert "2 seat(s) left" in error["hint"]

    ambiguous = await cli("activate", ent, "--feature", "client.script")
    assert ambiguous.code == 2 and "no network line of client.script" in ambiguous.stderr

    usage = await cli("activate", "--json")
    assert usage.code == 2 and usage.json["error"]["reason"] == "USAGE"
    assert (await cli("activate", ent, "--count", "0")).code == 2

    down = free_port()
    error = await cli.refused(
        3, "UNREACHABLE", "order", ent, "--administrator", f"127.0.0.1:{down}"
    )
    assert error["service"] == "Administrator" and "TESSERA_ADMINISTRATOR" in error["hint"]
    nowhere = await cli("licenses", "--json", "--license-server", f"{down}@127.0.0.1")
    assert nowhere.code == 3 and nowhere.json["error"]["service"] == "License Server"
    # An address that does not parse has the reason docs/operator.md names, whether
    # tessera finds it or the Administrator refuses it.
    for command in (["licenses"], ["activate", order["lines"][0]["activation_id"]]):
        error = await cli.refused(
            2, "INVALID_LICENSE_SERVER_ADDRESS", *command, "--license-server", "localhost"
        )
        # Refused before anything is sent, in one line that names the forms it takes.
        assert error["message"].startswith("Invalid license server configuration")
        assert "port@host" in error["message"] and "--license-server" in error["message"]
        assert error["metadata"]["field"] == "license_server"

    await restart_administrator(real_clock_site, activation_server=f"127.0.0.1:{down}")
    cli.point_at(real_clock_site)
    # The order lookup needs the vendor: no operation started, nothing to resume.
    error = await cli.refused(3, "PEER_UNAVAILABLE", "activate", ent, "--feature", "client.station")
    assert error["metadata"]["peer"] == "Activation Server"
    assert "Activation Server" in error["hint"] and "--operation-id" not in error["hint"]
    # By activation ID the License Server prepares first: the hint says how to resume.
    line = order["lines"][0]["activation_id"]
    stuck = await cli("activate", line, "--json")
    assert stuck.code == 3
    operation_id = stuck.json["error"]["hint"].split("--operation-id ")[1].split()[0]
    unfinished = await cli.json("operations", "--unfinished")
    assert [op["operation_id"] for op in unfinished["operations"]] == [operation_id]
    await restart_administrator(real_clock_site)
    cli.point_at(real_clock_site)
    resumed = await cli.json("activate", line, "--operation-id", operation_id)
    assert resumed["operation"]["state"] == "completed"

    status = await cli("status", "--json")
    assert status.code == 0
    assert [s["state"] for s in status.json["services"]] == ["serving", "serving"]
    status = await cli("status", "--vendor", "--activation-server", f"127.0.0.1:{down}")
    assert status.code == 3 and "unreachable" in status.stdout
