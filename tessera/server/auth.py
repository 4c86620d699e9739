"""Credentials and roles: who may call which RPC, for all three services.

``ACCESS`` is the one table of which role each service (and, where it differs, each
method) needs. A caller proves a role with a bearer credential
(``authorization: Bearer <token>`` metadata) or, on a mutual-TLS port, with its client
certificate's common name. Servers keep only SHA-256 digests of bearer tokens, compare
them in constant time and never log them.

A call that carries no usable credential ends UNAUTHENTICATED (``CREDENTIAL_MISSING``, or
``CREDENTIAL_INVALID`` for a token or certificate nobody configured); a known credential
of a role the method does not admit ends PERMISSION_DENIED (``ROLE_NOT_ALLOWED``).

Server-side credentials come from a credentials file of lines
``sha256:<hex> <role> <name>`` (a token's digest) or ``x509:<common name> <role> <name>``
(a client certificate's subject), from ``--<role>-token-sha256`` flags, from plaintext
``--<role>-token`` flags (hashed as soon as they are read), and from the token files a
service creates in its data directory for the client tools to read.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import inspect
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from tessera.auth import AUTHORIZATION
from tessera.errors import CredentialInvalid, CredentialMissing, DomainError, RoleNotAllowed
from tessera.keys import UnreadableKeyFile, create_private_file, read_private_file
from tessera.rpc import rich_status
from tessera.server.error_table import ErrorTable
from tessera.server.handlers import HandlerWrapper, abort, behaviour_of, rebuilt

if TYPE_CHECKING:
    from tessera.server.config import SettingsParser

log = logging.getLogger(__name__)

DIGEST_PREFIX = "sha256:"
IDENTITY_PREFIX = "x509:"


class Role(enum.StrEnum):
    """What a credential lets its holder do."""

    # Vendor staff: entitlements, keys, the audit log, forced returns (Activation Server).
    VENDOR_STAFF = "vendor-staff"
    # The site's operator: the Administrator's operations and the License Server's lease
    # administration and trusted storage.
    OPERATOR = "operator"
    # The Administrator acting for the operator on a License Server's trusted storage.
    ADMINISTRATOR = "administrator"
    # A licensed client (Enterprise Server, WorkStation) presenting the site token.
    CLIENT = "client"


@dataclass(frozen=True)
class Access:
    """Which roles may call a method. No roles: anyone. ``site``: anyone, unless the
    server holds a site token (a ``client`` credential); then only these roles."""

    roles: frozenset[Role]
    site: bool = False

    def admits(self, role: Role) -> bool:
        return role in self.roles


PUBLIC = Access(frozenset())


def _only(*roles: Role, site: bool = False) -> Access:
    return Access(frozenset(roles), site)


# Service -> method -> Access; "*" covers the service's other methods. A ``tessera.*``
# service missing here is refused to everyone; other services (health, reflection) are
# public.
ACCESS: Mapping[str, Mapping[str, Access]] = {
    # Administrators call it with host-signed envelopes: the License Server's host key is
    # the credential (and the Entitlement ID for GetOrder), as before.
    "tessera.activation.v1.ActivationService": {"*": PUBLIC},
    "tessera.activation.v1.VendorService": {"*": _only(Role.VENDOR_STAFF)},
    "tessera.license.v1.LeaseService": {
        "*": _only(Role.CLIENT, Role.OPERATOR, Role.ADMINISTRATOR, site=True)
    },
    "tessera.license.v1.LeaseAdminService": {"*": _only(Role.OPERATOR)},
    "tessera.license.v1.TrustedStorageService": {
        "*": _only(Role.ADMINISTRATOR, Role.OPERATOR),
        # Which License Server answers at an address: its public host id, nothing more.
        "GetHostIdentity": PUBLIC,
    },
    "tessera.admin.v1.AdministratorService": {"*": _only(Role.OPERATOR)},
}


def access_for(method: str, table: Mapping[str, Mapping[str, Access]] = ACCESS) -> Access | None:
    """The access rule of ``/package.Service/Method``; None when it is refused to all."""
    _, service, name = method.split("/", 2) if method.count("/") == 2 else ("", "", "")
    rules = table.get(service)
    if rules is None:
        return None if service.startswith("tessera.") or not service else PUBLIC
    return rules.get(name, rules.get("*"))


def token_digest(token: str) -> str:
    """``sha256:<hex>`` of a bearer token: what a server keeps instead of the token."""
    return DIGEST_PREFIX + hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a credential says the caller is."""

    role: Role
    name: str


@dataclass(frozen=True)
class Credentials:
    """The credentials a server accepts: token digests and certificate common names.
    Holds no plaintext."""

    digests: tuple[tuple[bytes, Principal], ...] = ()
    identities: Mapping[str, Principal] = field(default_factory=dict)

    def with_digest(self, digest: str, role: Role, name: str) -> Credentials:
        raw = _parse_digest(digest)
        return Credentials((*self.digests, (raw, Principal(role, name))), self.identities)

    def with_token(self, token: str, role: Role, name: str) -> Credentials:
        return self.with_digest(token_digest(token), role, name)

    def with_identity(self, common_name: str, role: Role, name: str) -> Credentials:
        return Credentials(self.digests, {**self.identities, common_name: Principal(role, name)})

    def merged(self, other: Credentials) -> Credentials:
        return Credentials((*self.digests, *other.digests), {**self.identities, **other.identities})

    def has_role(self, role: Role) -> bool:
        return any(p.role is role for _, p in self.digests) or any(
            p.role is role for p in self.identities.values()
        )

    def by_token(self, token: str) -> Principal | None:
        """The holder of ``token``; every digest is compared, in constant time each."""
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for digest, principal in self.digests:
            if hmac.compare_digest(presented, digest) and found is None:
                found = principal
        return found

    def by_common_name(self, common_name: str) -> Principal | None:
        return self.identities.get(common_name)


class CredentialsError(ValueError):
    """A credentials file or digest flag that cannot be used."""


def _parse_digest(text: str) -> bytes:
    hexdigest = text.strip().lower().removeprefix(DIGEST_PREFIX)
    if not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
        raise CredentialsError(f"not a SHA-256 digest (64 hex digits): {text[:12]!r}…")
    return bytes.fromhex(hexdigest)


def _role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        known = ", ".join(role.value for role in Role)
        raise CredentialsError(f"unknown role {text!r} (known: {known})") from None


def parse_credentials(text: str, source: str = "credentials") -> Credentials:
    """Lines ``sha256:<hex> <role> [<name>]`` or ``x509:<common name> <role> [<name>]``;
    blank lines and ``#`` comments are skipped. A plaintext token is refused."""
    credentials = Credentials()
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) not in (2, 3):
            raise CredentialsError(f"{source}:{number}: expected CREDENTIAL ROLE [NAME]")
        credential, role_text = words[0], words[1]
        name = words[2] if len(words) == 3 else f"{role_text}@{source}:{number}"
        try:
            role = _role(role_text)
            if credential.startswith(DIGEST_PREFIX):
                credentials = credentials.with_digest(credential, role, name)
            elif credential.startswith(IDENTITY_PREFIX) and len(credential) > len(IDENTITY_PREFIX):
                credentials = credentials.with_identity(
                    credential[len(IDENTITY_PREFIX) :], role, name
                )
            else:
                raise CredentialsError(
                    "a credential is sha256:<hex> or x509:<common name> (never a token itself)"
                )
        except CredentialsError as error:
            raise CredentialsError(f"{source}:{number}: {error}") from None
    return credentials


def load_credentials_file(path: Path) -> Credentials:
    try:
        text = path.read_text()
    except OSError as error:
        raise CredentialsError(f"cannot read {path}: {error.strerror}") from error
    return parse_credentials(text, str(path))


@dataclass(frozen=True)
class RoleFlags:
    """The flags that give one role's bearer token to a server."""

    stem: str  # e.g. "operator": --operator-token, --operator-token-sha256
    role: Role
    # The data-directory file made (and read) when no credential of the role is given;
    # '' for a role that has none by default (the site token).
    default_file: str = ""


def add_credential_flags(parser: SettingsParser, roles: Iterable[RoleFlags]) -> None:
    """--credentials-file, and --<stem>-token / --<stem>-token-sha256 per role."""
    parser.add(
        "--credentials-file",
        "",
        "file of 'sha256:<hex> ROLE NAME' / 'x509:<common name> ROLE NAME' lines "
        f"(roles: {', '.join(role.value for role in Role)})",
    )
    for flags in roles:
        default = f"default: data-dir file {flags.default_file}" if flags.default_file else "none"
        parser.add(
            f"--{flags.stem}-token",
            "",
            f"{flags.role.value} bearer token, hashed when read ({default})",
        )
        parser.add(
            f"--{flags.stem}-token-sha256",
            "",
            f"SHA-256 (hex) of the {flags.role.value} bearer token (instead of the token)",
        )


@dataclass(frozen=True)
class CredentialSettings:
    """The credentials given by flags, environment and file: digests only. Roles with
    none fall back to their data-directory token file (``with_token_files``)."""

    credentials: Credentials
    token_files: tuple[tuple[str, Role], ...]

    def with_token_files(self, data_dir: Path) -> Credentials:
        """The credentials, plus the data-directory token file of each role given none
        (created, mode 0600, when missing); only their digests are kept."""
        credentials = self.credentials
        for filename, role in self.token_files:
            if credentials.has_role(role):
                continue
            path = data_dir / filename
            token, created = load_or_create_token(path)
            if created:
                log.warning("created the %s bearer token in %s", role.value, path)
            credentials = credentials.with_token(token, role, f"{role.value} ({filename})")
        return credentials


def credential_settings(
    parser: SettingsParser, args: Any, roles: Iterable[RoleFlags]
) -> CredentialSettings:
    """The parsed credential flags; a bad digest or file is a usage error."""
    try:
        credentials = Credentials()
        if args.credentials_file:
            credentials = load_credentials_file(Path(args.credentials_file))
        token_files = []
        for flags in roles:
            attribute = flags.stem.replace("-", "_") + "_token"
            plaintext = getattr(args, attribute).strip()
            digest = getattr(args, attribute + "_sha256").strip()
            name = f"{flags.role.value} (--{flags.stem}-token)"
            if plaintext:
                credentials = credentials.with_token(plaintext, flags.role, name)
            if digest:
                credentials = credentials.with_digest(digest, flags.role, name + "-sha256")
            if flags.default_file:
                token_files.append((flags.default_file, flags.role))
            # The plaintext is not kept anywhere the settings go.
            setattr(args, attribute, "")
    except CredentialsError as error:
        parser.parser.error(str(error))
    return CredentialSettings(credentials, tuple(token_files))


def load_or_create_token(path: Path) -> tuple[str, bool]:
    """The token stored at ``path`` (mode 0600), created when missing (whole or not at
    all: ``create_private_file``). An existing file that group or others can read is
    refused (InsecureKeyFile), and so is one that holds no token (UnreadableKeyFile)."""
    token = secrets.token_urlsafe(32)
    if create_private_file(path, token + "\n"):
        return token, True
    stored = read_private_file(path, "token").decode(errors="replace").strip()
    if not stored:
        raise UnreadableKeyFile(
            f"{path} holds no token; move it away to have a new one made (callers using "
            "the old token must then be given the new one)"
        )
    return stored, False


def presented_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The bearer token in call metadata; '' for an authorization that is not a bearer
    token, None when there is no authorization at all."""
    presented = None
    for key, value in metadata or ():
        if key == AUTHORIZATION and isinstance(value, str):
            presented = value
    if presented is None:
        return None
    scheme, _, token = presented.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def peer_common_name(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The common name of the caller's verified client certificate (mutual TLS)."""
    names = (context.auth_context() or {}).get("x509_common_name") or []
    for name in names:
        return name.decode() if isinstance(name, bytes) else str(name)
    return None


class AccessControl(HandlerWrapper):
    """Admits a call only with a credential of a role ``ACCESS`` allows for its method;
    a refusal gets its status code from the service's error table. What a method needs
    is settled when it is registered; per call only its credential is judged."""

    def __init__(
        self,
        credentials: Credentials,
        errors: ErrorTable,
        table: Mapping[str, Mapping[str, Access]] = ACCESS,
    ) -> None:
        self.credentials = credentials
        self.errors = errors
        self.table = table
        self._site_token = credentials.has_role(Role.CLIENT)

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        access = access_for(method, self.table)
        if access is None:
            refused = RoleNotAllowed("no role may call this method")
            return _checked_at_call(handler, lambda _context: self._status(method, refused))
        if not access.roles or (access.site and not self._site_token):
            return handler  # open to all callers: nothing to judge per call
        return _checked_at_call(handler, lambda context: self._judge(method, access, context))

    def _judge(
        self, method: str, access: Access, context: grpc.aio.ServicerContext[Any, Any]
    ) -> grpc.Status | None:
        """The refusal of this call, or None when its credential admits it."""
        token = presented_token(context.invocation_metadata())
        if token is None and self.credentials.identities:
            return self._judge_peer(method, access, context)
        if not token:
            return self._status(method, _missing())
        principal = self.credentials.by_token(token)
        if principal is None:
            return self._status(method, _invalid())
        if not access.admits(principal.role):
            return self._status(method, _not_allowed(principal), principal)
        log.debug("%s admitted for %s (%s)", method, principal.name, principal.role.value)
        return None

    def _judge_peer(
        self, method: str, access: Access, context: grpc.aio.ServicerContext[Any, Any]
    ) -> grpc.Status | None:
        common_name = peer_common_name(context)
        if common_name is None:
            return self._status(method, _missing())
        principal = self.credentials.by_common_name(common_name)
        if principal is None:
            return self._status(method, _invalid())
        if not access.admits(principal.role):
            return self._status(method, _not_allowed(principal), principal)
        log.debug("%s admitted for %s (%s, mTLS)", method, principal.name, principal.role.value)
        return None

    def _status(
        self, method: str, error: DomainError, principal: Principal | None = None
    ) -> grpc.Status:
        who = f" for {principal.name} (role {principal.role.value})" if principal else ""
        log.warning("refused %s%s: %s", method, who, error.reason)
        return rich_status(
            self.errors.code_for(error), error.message, error.reason, self.errors.domain,
            error.metadata,
        )  # fmt: skip


def _missing() -> CredentialMissing:
    return CredentialMissing(
        "this call needs a credential (a bearer token or a client certificate)"
    )


def _invalid() -> CredentialInvalid:
    return CredentialInvalid("the credential is not valid")


def _not_allowed(principal: Principal) -> RoleNotAllowed:
    return RoleNotAllowed(
        f"the {principal.role.value} role may not call this method",
        metadata={"role": principal.role.value},
    )


def _checked_at_call(
    handler: grpc.RpcMethodHandler[Any, Any],
    judge: Callable[[grpc.aio.ServicerContext[Any, Any]], grpc.Status | None],
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler``, of the same kind, ending the call with the status ``judge`` returns
    before the behaviour runs (None: run it)."""
    inner = behaviour_of(handler)

    if inspect.isasyncgenfunction(inner):

        async def checked_stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            status = judge(context)
            if status is not None:
                await abort(context, status)
            async for response in inner(request, context):
                yield response

        return rebuilt(handler, checked_stream)

    async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        status = judge(context)
        if status is not None:
            await abort(context, status)
        return await inner(request, context)

    return rebuilt(handler, checked)
