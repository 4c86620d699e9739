"""License Server settings: flags, or environment variables prefixed TESSERA_LS_."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.license_server.domain.admission import ClientLimits
from services.license_server.domain.leasing import LeasePolicy
from tessera.address import DEFAULT_PORT
from tessera.server.auth import (
    CredentialSettings,
    Role,
    RoleFlags,
    add_credential_flags,
    credential_settings,
)
from tessera.server.config import CommonSettings, SettingsParser

DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
CREDENTIAL_ROLES = (
    RoleFlags("operator", Role.OPERATOR, "operator-token"),
    RoleFlags("administrator", Role.ADMINISTRATOR, "administrator-token"),
    # A site token makes LeaseService require it (or an operator/administrator token).
    RoleFlags("site", Role.CLIENT),
)


@dataclass(frozen=True)
class Settings:
    common: CommonSettings
    # Files of vendor public keys to trust (hex, one per line).
    vendor_keys: list[Path]
    # Overrides the machine identity the host key is bound to (tests, containers).
    machine_id: str
    policy: LeasePolicy
    sweep_interval: float
    # Seconds between re-judgements of trusted storage (also done at start).
    trust_check_interval: float
    # Operator, administrator and site credentials (digests only); operator and
    # administrator default to the data directory's operator-token and administrator-token.
    credentials: CredentialSettings
    # Each client host's share: open lease streams, acquire rate, idle streams.
    client_limits: ClientLimits = field(default_factory=ClientLimits)

    @property
    def database_url(self) -> str:
        return self.common.database_url_or_default("license.db")

    @property
    def host_key(self) -> Path:
        return self.common.data_dir / "host.key"


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    parser = SettingsParser(
        prog="python -m services.license_server",
        description="Tessera License Server: trusted storage and network seat leasing.",
        prefix="TESSERA_LS_",
        default_listen=DEFAULT_LISTEN,
        default_data_dir="var/license_server",
        environ=environ,
        service="license_server",
        # Lease messages are a few hundred bytes; a vendor answer a few KB per certificate.
        default_max_message_bytes=1024 * 1024,
    )
    parser.add("--vendor-keys", "", "comma-separated files of trusted vendor public keys")
    parser.add(
        "--machine-id", "", "machine identity to bind the host key to (default: /etc/machine-id)"
    )
    parser.add("--lease-ttl", "90", "seconds a lease lives without a heartbeat")
    parser.add("--heartbeat-interval", "30", "seconds between the heartbeats clients send")
    parser.add("--sweep-interval", "5", "seconds between sweeps that free expired leases")
    parser.add(
        "--trust-check-interval", "60", "seconds between re-verifications of trusted storage"
    )
    parser.add(
        "--group-commit-delay",
        f"{LeasePolicy().group_commit_delay_seconds:g}",
        "under load, seconds a checkout/check-in transaction waits for more calls to join it; "
        "0: never",
    )
    parser.add(
        "--replica-timeout",
        f"{LeasePolicy().replica_timeout_seconds:g}",
        "seconds a License Server process may go without its beat before the others (on one "
        "PostgreSQL database) declare it dead and drop its queued clients",
    )
    add_credential_flags(parser, CREDENTIAL_ROLES)
    defaults = ClientLimits()
    parser.add(
        "--max-streams-per-host",
        str(defaults.max_streams_per_host),
        "lease streams one client host (connection address) may have open; 0: no limit",
    )
    parser.add(
        "--acquire-rate",
        f"{defaults.acquire_rate:g}",
        "acquires (stream or Checkout) a second one client host may make; 0: no limit",
    )
    parser.add("--acquire-burst", str(defaults.acquire_burst), "acquires a host may make at once")
    parser.add(
        "--stream-idle-seconds",
        f"{defaults.stream_idle_seconds:g}",
        "a lease stream that sends no acquire or resume this long is closed; 0: never",
    )
    common, args = parser.parse(argv)
    credentials = credential_settings(parser, args, CREDENTIAL_ROLES)
    client_limits = _client_limits(parser, args)
    try:
        ttl = int(args.lease_ttl)
        interval = float(args.heartbeat_interval)
        sweep = float(args.sweep_interval)
        trust_check = float(args.trust_check_interval)
        delay = float(args.group_commit_delay)
        replica_timeout = float(args.replica_timeout)
    except ValueError as error:
        parser.parser.error(f"lease timings must be numbers: {error}")
    if not 0 <= delay <= 1:
        parser.parser.error("--group-commit-delay must be between 0 and 1 second")
    if not 0.2 <= replica_timeout <= 60:
        parser.parser.error("--replica-timeout must be between 0.2 and 60 seconds")
    if ttl < 1 or interval <= 0 or sweep <= 0 or trust_check <= 0:
        parser.parser.error(
            "--lease-ttl, --heartbeat-interval, --sweep-interval and --trust-check-interval "
            "must be > 0"
        )
    vendor_keys = [Path(p) for p in args.vendor_keys.split(",") if p.strip()] or [
        common.data_dir / "vendor-keys.pub"
    ]
    return Settings(
        common=common,
        vendor_keys=vendor_keys,
        machine_id=args.machine_id,
        policy=LeasePolicy(
            ttl_seconds=ttl,
            heartbeat_interval_seconds=interval,
            group_commit_delay_seconds=delay,
            replica_timeout_seconds=replica_timeout,
        ),
        sweep_interval=sweep,
        trust_check_interval=trust_check,
        credentials=credentials,
        client_limits=client_limits,
    )


def _client_limits(parser: SettingsParser, args: argparse.Namespace) -> ClientLimits:
    try:
        limits = ClientLimits(
            max_streams_per_host=int(args.max_streams_per_host),
            acquire_rate=float(args.acquire_rate),
            acquire_burst=int(args.acquire_burst),
            stream_idle_seconds=float(args.stream_idle_seconds),
        )
    except ValueError as error:
        parser.parser.error(f"client limits must be numbers: {error}")
    numbers = (limits.acquire_rate, limits.stream_idle_seconds)
    if (
        limits.max_streams_per_host < 0
        or limits.acquire_burst < 1
        or not all(0 <= number < float("inf") for number in numbers)
    ):
        parser.parser.error(
            "--max-streams-per-host, --acquire-rate and --stream-idle-seconds must be >= 0, "
            "--acquire-burst >= 1"
        )
    return limits
