"""Administrator settings: flags, or environment variables prefixed TESSERA_ADMIN_."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tessera.server.auth import (
    CredentialSettings,
    Role,
    RoleFlags,
    add_credential_flags,
    credential_settings,
)
from tessera.server.config import CommonSettings, SettingsParser
from tessera.tls import ClientTls, TlsConfigurationError, client_tls

DEFAULT_LISTEN = "127.0.0.1:27200"
DEFAULT_ACTIVATION_SERVER = "127.0.0.1:27100"
# --operator-token / --operator-token-sha256; operator-token in the data directory otherwise.
CREDENTIAL_ROLES = (RoleFlags("operator", Role.OPERATOR, "operator-token"),)


@dataclass(frozen=True)
class Settings:
    common: CommonSettings
    # gRPC target (host:port) of the vendor's Activation Server.
    activation_server: str
    # Who may call the Administrator (digests only); default: the data directory's
    # operator-token.
    credentials: CredentialSettings
    # The credential presented to License Servers (their administrator-token, or an
    # operator token): a file read at each connection, or the token itself.
    license_server_token_file: Path | None = None
    license_server_token: str = field(default="", repr=False)
    # How the Administrator dials the Activation Server and License Servers (None:
    # plaintext).
    activation_server_tls: ClientTls | None = None
    license_server_tls: ClientTls | None = None
    # How often to ask the License Servers in the journal whether a check-in with the
    # vendor is due (their licenses' check-in policy); 0: never by itself.
    check_in_poll_seconds: float = 3600.0

    @property
    def database_url(self) -> str:
        return self.common.database_url_or_default("administrator.db")

    def license_server_credential(self) -> str | None:
        """The token to present to License Servers now, if any (the file is read anew, so
        it may be created, or rotated, after the Administrator started)."""
        if self.license_server_token:
            return self.license_server_token
        if self.license_server_token_file is None:
            return None
        try:
            return self.license_server_token_file.read_text().strip() or None
        except OSError:
            return None


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
    for peer, name in (
        ("activation-server", "the Activation Server"),
        ("license-server", "License Servers"),
    ):
        parser.add_switch(
            f"--{peer}-tls", f"dial {name} over TLS (implied by the other --{peer}-tls-* flags)"
        )
        parser.add(
            f"--{peer}-tls-ca", "", f"PEM CA to trust for {name} (default: the system's roots)"
        )
        parser.add(f"--{peer}-tls-cert", "", f"PEM client certificate for {name} (mutual TLS)")
        parser.add(f"--{peer}-tls-key", "", f"PEM key of --{peer}-tls-cert (mode 0600)")
        parser.add(
            f"--{peer}-tls-server-name",
            "",
            f"the name the certificate of {name} carries, when not the host dialled",
        )
    add_credential_flags(parser, CREDENTIAL_ROLES)
    parser.add(
        "--license-server-token-file",
        "",
        "file with the token to present to License Servers (their administrator-token)",
    )
    parser.add(
        "--license-server-token",
        "",
        "the token to present to License Servers itself (prefer the file, or the env)",
    )
    parser.add(
        "--check-in-poll",
        "3600",
        "seconds between asking the License Servers in the journal whether their licenses' "
        "check-in policy makes a check-in with the vendor due; 0: only on demand",
    )
    common, args = parser.parse(argv)
    credentials = credential_settings(parser, args, CREDENTIAL_ROLES)
    try:
        check_in_poll = float(args.check_in_poll)
    except ValueError:
        parser.parser.error(
            f"--check-in-poll must be a number of seconds, not {args.check_in_poll!r}"
        )
    if not check_in_poll >= 0:
        parser.parser.error("--check-in-poll must be 0 or more seconds")
    token_file = args.license_server_token_file.strip()
    try:
        activation_server_tls = client_tls(
            args.activation_server_tls,
            args.activation_server_tls_ca,
            args.activation_server_tls_cert,
            args.activation_server_tls_key,
            args.activation_server_tls_server_name,
        )
        license_server_tls = client_tls(
            args.license_server_tls,
            args.license_server_tls_ca,
            args.license_server_tls_cert,
            args.license_server_tls_key,
            args.license_server_tls_server_name,
        )
    except TlsConfigurationError as error:
        parser.parser.error(str(error))
    return Settings(
        common=common,
        activation_server=args.activation_server,
        activation_server_tls=activation_server_tls,
        license_server_tls=license_server_tls,
        credentials=credentials,
        license_server_token_file=Path(token_file) if token_file else None,
        license_server_token=args.license_server_token.strip(),
        check_in_poll_seconds=check_in_poll,
    )
