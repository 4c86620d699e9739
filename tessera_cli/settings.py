"""Where the services are and which credentials to present.

Each setting comes from the first of: a command-line flag, an environment variable, the
config file (``--config``, ``TESSERA_CONFIG``, else ``$XDG_CONFIG_HOME/tessera/cli.toml``
or ``~/.config/tessera/cli.toml``), and a default that matches ``make up``. Tokens may
also come from the files ``make up`` leaves in its data directory (``./var`` unless told
otherwise): ``var/administrator/operator-token`` (the Administrator's),
``var/license_server/operator-token`` and ``var/activation_server/vendor-token``.
``tessera config`` shows what won and why.

A service address given empty or blank (``--license-server "$UNSET"``, an empty
``TESSERA_LICENSE_SERVER=``, ``license_server = ""``) is refused, not taken as "use the
default": the default is the local server, and a command meant for another one would
change this one. A License Server address that does not parse is refused before any
call, naming where it came from.

TLS (``--tls``, ``--tls-ca``, ``--tls-cert``/``--tls-key`` for mutual TLS,
``--tls-server-name``) applies to every service the CLI calls; without it the CLI speaks
plaintext, as ``make up``'s loopback services do.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.address import parse_address
from tessera.errors import InvalidLicenseServerAddress
from tessera.tls import ClientTls, TlsConfigurationError, client_tls
from tessera_cli.failures import CliError, ExitCode, Failure, UsageError

DEFAULT_ADMINISTRATOR = "127.0.0.1:27200"
DEFAULT_LICENSE_SERVER = "@localhost"
DEFAULT_ACTIVATION_SERVER = "127.0.0.1:27100"
DEFAULT_TIMEOUT = 60.0
DEFAULT_DATA_DIR = "var"

OPERATOR_TOKEN_FILE = Path("license_server") / "operator-token"
ADMINISTRATOR_TOKEN_FILE = Path("administrator") / "operator-token"
VENDOR_TOKEN_FILE = Path("activation_server") / "vendor-token"

CONFIG_KEYS = {
    "administrator": "Administrator host:port",
    "license_server": "License Server address (EBO style: @host, port@host, ';'-separated)",
    "activation_server": "Activation Server host:port (vendor staff)",
    "administrator_token": "operator bearer token for the Administrator",
    "administrator_token_file": "file holding the Administrator's operator bearer token",
    "operator_token": "operator bearer token for the License Server",
    "operator_token_file": "file holding the operator bearer token",
    "vendor_token": "vendor-staff bearer token for the Activation Server",
    "vendor_token_file": "file holding the vendor-staff bearer token",
    "timeout": "seconds to wait for an answer",
    "data_dir": "the `make up` data directory whose token files are read",
    "tls": "true: speak TLS to every service (implied by the tls_* keys)",
    "tls_ca": "PEM file of the CA that signed the services' certificates",
    "tls_cert": "PEM client certificate, for services that ask for mutual TLS",
    "tls_key": "PEM key of tls_cert (mode 0600)",
    "tls_server_name": "the name the services' certificates carry, when not the host dialled",
}
TRUE_WORDS = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Flags:
    """The connection flags as given on the command line (None: not given)."""

    administrator: str | None = None
    license_server: str | None = None
    activation_server: str | None = None
    operator_token_file: str | None = None
    vendor_token_file: str | None = None
    timeout: str | None = None
    administrator_token_file: str | None = None
    data_dir: str | None = None
    config: str | None = None
    tls: bool | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None


@dataclass(frozen=True)
class Setting:
    """One resolved value and where it came from (for ``tessera config``)."""

    value: str
    source: str


@dataclass(frozen=True)
class Token:
    """A bearer token, read when a command needs it."""

    source: str
    value: str | None = None
    path: Path | None = None

    def read(self) -> str:
        if self.value is not None:
            return self.value
        assert self.path is not None
        try:
            token = self.path.read_text().strip()
        except OSError as error:
            raise UsageError(
                f"cannot read the token file {self.path} ({self.source}): {error.strerror}"
            ) from error
        if not token:
            raise UsageError(f"the token file {self.path} ({self.source}) is empty")
        return token


@dataclass(frozen=True)
class Settings:
    administrator: Setting
    license_server: Setting
    activation_server: Setting
    timeout: float
    timeout_source: str
    data_dir: Setting
    operator_token: Token | None
    vendor_token: Token | None
    config_file: Path | None
    # How every service is dialled (None: plaintext), and where that came from.
    tls: ClientTls | None = None
    tls_source: str = "default"
    # The operator token the Administrator admits (its data directory's operator-token).
    administrator_token: Token | None = None


def default_config_path(environ: Mapping[str, str], home: Path) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or str(home / ".config")
    return Path(base) / "tessera" / "cli.toml"


def load_config(
    flags: Flags, environ: Mapping[str, str], home: Path
) -> tuple[dict[str, Any], Path | None]:
    """The config file's table and its path; an explicit file must exist."""
    explicit = flags.config or environ.get("TESSERA_CONFIG")
    path = Path(explicit).expanduser() if explicit else default_config_path(environ, home)
    if not path.exists():
        if explicit:
            raise UsageError(f"the config file {path} does not exist")
        return {}, None
    try:
        table = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise UsageError(f"cannot read the config file {path}: {error}") from error
    unknown = sorted(set(table) - set(CONFIG_KEYS))
    if unknown:
        raise UsageError(
            f"the config file {path} has unknown keys: {', '.join(unknown)} "
            f"(known: {', '.join(CONFIG_KEYS)})"
        )
    for key, value in table.items():
        if key == "timeout":
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise UsageError(f"the config file {path}: timeout must be a number of seconds")
        elif key == "tls":
            if not isinstance(value, bool):
                raise UsageError(f"the config file {path}: tls must be true or false")
        elif not isinstance(value, str):
            raise UsageError(f"the config file {path}: {key} must be a string")
    return table, path


def resolve(
    flags: Flags,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    home: Path | None = None,
) -> Settings:
    """The settings in force: flags, then environment, then config file, then defaults."""
    environ = os.environ if environ is None else environ
    cwd = cwd or Path.cwd()
    home = home or Path.home()
    config, config_path = load_config(flags, environ, home)
    config_source = f"config {config_path}"

    def pick(flag: str | None, flag_name: str, env: str, key: str, default: str) -> Setting:
        if flag:
            return Setting(flag, f"flag {flag_name}")
        if environ.get(env):
            return Setting(environ[env], f"env {env}")
        if key in config:
            return Setting(str(config[key]), config_source)
        return Setting(default, "default")

    def address(
        flag: str | None, flag_name: str, env: str, key: str, default: str
    ) -> tuple[Setting, str]:
        """Like ``pick``, and where it was given in words ('' for the default). Given at
        all, even empty, a setting wins: an unset shell variable must not fall through
        to the default (the local server) and act there."""
        if flag is not None:
            return Setting(flag, f"flag {flag_name}"), flag_name
        if env in environ:
            return Setting(environ[env], f"env {env}"), env
        if key in config:
            return Setting(str(config[key]), config_source), f"{key} in {config_path}"
        return Setting(default, "default"), ""

    def host_port(flag: str | None, flag_name: str, env: str, key: str, default: str) -> Setting:
        setting, where = address(flag, flag_name, env, key, default)
        if where and not setting.value.strip():
            raise UsageError(f"{where} is empty; give HOST:PORT, e.g. {default}")
        return setting

    def relative_to_config(text: str) -> Path:
        path = Path(text).expanduser()
        if config_path is not None and not path.is_absolute():
            path = config_path.parent / path
        return path

    data_dir = pick(flags.data_dir, "--data-dir", "TESSERA_DATA_DIR", "data_dir", DEFAULT_DATA_DIR)
    data_path = (
        relative_to_config(data_dir.value)
        if data_dir.source == config_source
        else cwd / Path(data_dir.value).expanduser()
    )

    def token(kind: str, default_file: Path) -> Token | None:
        flag = getattr(flags, f"{kind}_token_file")
        env = f"TESSERA_{kind.upper()}_TOKEN"
        if flag:
            return Token(f"flag --{kind}-token-file", path=cwd / Path(flag).expanduser())
        if environ.get(env):
            return Token(f"env {env}", value=environ[env].strip())
        if environ.get(env + "_FILE"):
            return Token(f"env {env}_FILE", path=cwd / Path(environ[env + "_FILE"]).expanduser())
        if f"{kind}_token" in config:
            return Token(config_source, value=str(config[f"{kind}_token"]).strip())
        if f"{kind}_token_file" in config:
            return Token(config_source, path=relative_to_config(str(config[f"{kind}_token_file"])))
        candidate = data_path / default_file
        if candidate.is_file():
            return Token(f"file {candidate}", path=candidate)
        return None

    timeout = pick(flags.timeout, "--timeout", "TESSERA_TIMEOUT", "timeout", str(DEFAULT_TIMEOUT))
    try:
        seconds = float(timeout.value)
    except ValueError:
        raise UsageError(f"timeout ({timeout.source}): {timeout.value!r} is not a number") from None
    if not seconds > 0:
        raise UsageError(f"timeout ({timeout.source}): must be more than 0 seconds")

    tls, tls_source = _tls(flags, environ, config, config_source, cwd, relative_to_config)

    license_server, where = address(
        flags.license_server,
        "--license-server",
        "TESSERA_LICENSE_SERVER",
        "license_server",
        DEFAULT_LICENSE_SERVER,
    )
    if where:
        check_license_server(license_server.value, where)

    return Settings(
        administrator=host_port(
            flags.administrator,
            "--administrator",
            "TESSERA_ADMINISTRATOR",
            "administrator",
            DEFAULT_ADMINISTRATOR,
        ),
        license_server=license_server,
        activation_server=host_port(
            flags.activation_server,
            "--activation-server",
            "TESSERA_ACTIVATION_SERVER",
            "activation_server",
            DEFAULT_ACTIVATION_SERVER,
        ),
        timeout=seconds,
        timeout_source=timeout.source,
        data_dir=Setting(str(data_path), data_dir.source),
        operator_token=token("operator", OPERATOR_TOKEN_FILE),
        vendor_token=token("vendor", VENDOR_TOKEN_FILE),
        config_file=config_path,
        tls=tls,
        tls_source=tls_source,
        administrator_token=token("administrator", ADMINISTRATOR_TOKEN_FILE),
    )


def check_license_server(address: str, where: str, field: str = "license_server") -> str:
    """``address`` if it is a License Server address, else a one-line refusal (exit 2,
    reason INVALID_LICENSE_SERVER_ADDRESS, metadata ``field`` as the Administrator gives
    it) that names ``where`` it came from (a flag, an environment variable, the config
    file)."""
    if not address.strip():
        message = f"{where} is empty; give an address, e.g. @localhost or 27000@es-host"
    else:
        try:
            parse_address(address)
            return address
        except InvalidLicenseServerAddress as error:
            message = f"{error.message} ({where})"
    raise CliError(
        Failure(
            ExitCode.USAGE,
            message,
            reason=InvalidLicenseServerAddress.reason,
            metadata={"field": field},
        )
    )


def _tls(
    flags: Flags,
    environ: Mapping[str, str],
    config: Mapping[str, Any],
    config_source: str,
    cwd: Path,
    relative_to_config: Callable[[str], Path],
) -> tuple[ClientTls | None, str]:
    """The TLS settings, each from its flag, environment variable or config key; files
    named on the command line or in the environment are relative to the working
    directory, those in the config file to the config file."""
    sources: list[str] = []

    def file(flag: str | None, flag_name: str, env: str, key: str) -> str:
        if flag:
            sources.append(f"flag {flag_name}")
            return str(cwd / Path(flag).expanduser())
        if environ.get(env):
            sources.append(f"env {env}")
            return str(cwd / Path(environ[env]).expanduser())
        if key in config:
            sources.append(config_source)
            return str(relative_to_config(str(config[key])))
        return ""

    enabled = False
    if flags.tls:
        enabled = True
        sources.append("flag --tls")
    elif environ.get("TESSERA_TLS", "").strip().lower() in TRUE_WORDS:
        enabled = True
        sources.append("env TESSERA_TLS")
    elif config.get("tls") is True:
        enabled = True
        sources.append(config_source)
    ca = file(flags.tls_ca, "--tls-ca", "TESSERA_TLS_CA", "tls_ca")
    cert = file(flags.tls_cert, "--tls-cert", "TESSERA_TLS_CERT", "tls_cert")
    key = file(flags.tls_key, "--tls-key", "TESSERA_TLS_KEY", "tls_key")
    server_name = ""
    if flags.tls_server_name:
        server_name = flags.tls_server_name
        sources.append("flag --tls-server-name")
    elif environ.get("TESSERA_TLS_SERVER_NAME"):
        server_name = environ["TESSERA_TLS_SERVER_NAME"]
        sources.append("env TESSERA_TLS_SERVER_NAME")
    elif "tls_server_name" in config:
        server_name = str(config["tls_server_name"])
        sources.append(config_source)
    try:
        tls = client_tls(enabled, ca, cert, key, server_name)
    except TlsConfigurationError as error:
        raise UsageError(
            f"TLS: {error}", "Give --tls-cert and --tls-key together (mutual TLS)."
        ) from None
    return tls, ", ".join(dict.fromkeys(sources)) or "default"
