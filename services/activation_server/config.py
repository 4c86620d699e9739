"""Activation Server settings: flags, or environment variables prefixed TESSERA_AS_."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.activation_server.domain.limits import Limits
from tessera.server.auth import (
    CredentialSettings,
    Role,
    RoleFlags,
    add_credential_flags,
    credential_settings,
)
from tessera.server.config import CommonSettings, SettingsParser

DEFAULT_LISTEN = "127.0.0.1:27100"
# --vendor-token / --vendor-token-sha256; vendor-token in the data directory otherwise.
CREDENTIAL_ROLES = (RoleFlags("vendor", Role.VENDOR_STAFF, "vendor-token"),)


@dataclass(frozen=True)
class Settings:
    common: CommonSettings
    # The first vendor signing key file; default: vendor-signing.key in the data
    # directory. Keys made by rotation, and vendor-keys.pub, lie beside it.
    signing_key: Path
    # Vendor-staff credentials (digests only); default: the data directory's vendor-token.
    credentials: CredentialSettings
    limits: Limits = field(default_factory=Limits)

    @property
    def database_url(self) -> str:
        return self.common.database_url_or_default("activation.db")


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    parser = SettingsParser(
        prog="python -m services.activation_server",
        description="Tessera Activation Server: entitlements, activations, vendor keys.",
        prefix="TESSERA_AS_",
        default_listen=DEFAULT_LISTEN,
        default_data_dir="var/activation_server",
        environ=environ,
        service="activation_server",
    )
    parser.add("--signing-key", "", "vendor Ed25519 key file (created when missing)")
    add_credential_flags(parser, CREDENTIAL_ROLES)
    parser.add(
        "--max-returns-per-entitlement", "10", "credited returns an order may have per window"
    )
    parser.add("--return-window-days", "30", "the rolling window of that limit, in days")
    parser.add("--max-repairs-per-year", "4", "repairs a host may have in any 365 days")
    parser.add(
        "--max-activations-per-entitlement",
        "100",
        "network activations an order may have per window (bounds activate/return cycling)",
    )
    parser.add("--activation-window-days", "30", "the rolling window of that limit, in days")
    common, args = parser.parse(argv)
    credentials = credential_settings(parser, args, CREDENTIAL_ROLES)
    signing_key = (
        Path(args.signing_key) if args.signing_key else common.data_dir / "vendor-signing.key"
    )
    limits = Limits(
        max_returns_per_entitlement=_whole_number(
            parser, "--max-returns-per-entitlement", args.max_returns_per_entitlement, 0
        ),
        return_window=dt.timedelta(
            days=_whole_number(parser, "--return-window-days", args.return_window_days, 1)
        ),
        max_repairs_per_year=_whole_number(
            parser, "--max-repairs-per-year", args.max_repairs_per_year, 0
        ),
        max_activations_per_entitlement=_whole_number(
            parser, "--max-activations-per-entitlement", args.max_activations_per_entitlement, 0
        ),
        activation_window=dt.timedelta(
            days=_whole_number(parser, "--activation-window-days", args.activation_window_days, 1)
        ),
    )
    return Settings(common=common, signing_key=signing_key, credentials=credentials, limits=limits)


def _whole_number(parser: SettingsParser, flag: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        parser.parser.error(f"{flag}: {value!r} is not a whole number of at least {minimum}")
    return number
