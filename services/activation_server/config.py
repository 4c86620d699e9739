"""Activation Server settings: flags, or environment variables prefixed TESSERA_AS_."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tessera.config import CommonSettings, SettingsParser

DEFAULT_LISTEN = "127.0.0.1:27100"


@dataclass(frozen=True)
class Settings:
    common: CommonSettings
    # Vendor signing key file; default: vendor-signing.key in the data directory.
    signing_key: Path
    # Vendor-staff bearer token; default: read from (or created in) vendor-token.
    vendor_token: str

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
    )
    parser.add("--signing-key", "", "vendor Ed25519 key file (created when missing)")
    parser.add("--vendor-token", "", "bearer token for VendorService (default: data-dir file)")
    common, args = parser.parse(argv)
    signing_key = (
        Path(args.signing_key) if args.signing_key else common.data_dir / "vendor-signing.key"
    )
    return Settings(common=common, signing_key=signing_key, vendor_token=args.vendor_token)
