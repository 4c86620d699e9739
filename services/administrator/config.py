"""Administrator settings: flags, or environment variables prefixed TESSERA_ADMIN_."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tessera.config import CommonSettings, SettingsParser

DEFAULT_LISTEN = "127.0.0.1:27200"
DEFAULT_ACTIVATION_SERVER = "127.0.0.1:27100"


@dataclass(frozen=True)
class Settings:
    common: CommonSettings
    # gRPC target (host:port) of the vendor's Activation Server.
    activation_server: str

    @property
    def database_url(self) -> str:
        return self.common.database_url_or_default("administrator.db")


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    parser = SettingsParser(
        prog="python -m services.administrator",
        description="Tessera Administrator: activation between License Server and vendor.",
        prefix="TESSERA_ADMIN_",
        default_listen=DEFAULT_LISTEN,
        default_data_dir="var/administrator",
        environ=environ,
        service="administrator",
        # One operation asks the License Server and the vendor in turn, each call up to
        # its own 30 s; the journal resumes an operation cut short.
        default_max_call_seconds=120,
    )
    parser.add("--activation-server", DEFAULT_ACTIVATION_SERVER, "Activation Server host:port")
    common, args = parser.parse(argv)
    return Settings(common=common, activation_server=args.activation_server)
