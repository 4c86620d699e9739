"""Channels to the three services, opened when a command first needs one.

Every call goes through ``Connections.call``, which applies the deadline and the bearer
token and turns a failed call into a ``CliError`` that names the service. The License
Server is found the way EBO clients find it: each server and port of its address in
order (``@host`` tries 27000-27009), the first that answers wins. Channels are TLS when
the settings say so (``--tls``, ``--tls-ca``, …), else plaintext.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from tessera.activation.v1 import activation_pb2_grpc
from tessera.address import parse_address
from tessera.admin.v1 import admin_pb2_grpc
from tessera.auth import bearer_metadata
from tessera.errors import InvalidLicenseServerAddress
from tessera.keys import InsecureKeyFile
from tessera.license.v1 import license_pb2, license_pb2_grpc
from tessera.tls import TlsConfigurationError, open_channel
from tessera_cli.failures import (
    CliError,
    ExitCode,
    Failure,
    InvalidAddress,
    Service,
    UsageError,
    explain,
)
from tessera_cli.settings import Settings, Token

Req = TypeVar("Req")
Resp = TypeVar("Resp")

PROBE_TIMEOUT = 3.0


@dataclass(frozen=True)
class LicenseServerLink:
    """The License Server that answered at one target of the address."""

    address: str
    target: str
    host_id: str
    leases: license_pb2_grpc.LeaseServiceAsyncStub
    trusted_storage: license_pb2_grpc.TrustedStorageServiceAsyncStub
    lease_admin: license_pb2_grpc.LeaseAdminServiceAsyncStub


class Connections:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._license_server: LicenseServerLink | None = None
        # The operation id of the journaled operation a command is running, so a failure
        # can say how to resume it.
        self.operation_id = ""

    def channel(self, target: str) -> grpc.aio.Channel:
        if target not in self._channels:
            try:
                self._channels[target] = open_channel(target, self.settings.tls)
            except (TlsConfigurationError, InsecureKeyFile) as error:
                raise UsageError(
                    f"TLS ({self.settings.tls_source}): {error}",
                    "`tessera config` shows the TLS settings in use.",
                ) from error
        return self._channels[target]

    @property
    def administrator_target(self) -> str:
        return self.settings.administrator.value

    @property
    def activation_target(self) -> str:
        return self.settings.activation_server.value

    def administrator(self) -> admin_pb2_grpc.AdministratorServiceAsyncStub:
        return admin_pb2_grpc.AdministratorServiceStub(self.channel(self.administrator_target))

    def activation(self) -> activation_pb2_grpc.ActivationServiceAsyncStub:
        return activation_pb2_grpc.ActivationServiceStub(self.channel(self.activation_target))

    def vendor(self) -> activation_pb2_grpc.VendorServiceAsyncStub:
        return activation_pb2_grpc.VendorServiceStub(self.channel(self.activation_target))

    async def call(
        self,
        service: Service,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        *,
        token: Token | None = None,
        target: str | None = None,
    ) -> Resp:
        """One unary call with the deadline and a token (``token``, else the one set for the
        service, if any); a failure becomes a CliError."""
        if token is None:
            token = {
                Service.ADMINISTRATOR: self.settings.administrator_token,
                Service.LICENSE_SERVER: self.settings.operator_token,
            }.get(service)
        if target is None:
            target = {
                Service.ADMINISTRATOR: self.administrator_target,
                Service.ACTIVATION_SERVER: self.activation_target,
                Service.LICENSE_SERVER: self.settings.license_server.value,
            }[service]
        metadata = bearer_metadata(token.read()) if token is not None else None
        try:
            return await method(request, timeout=self.settings.timeout, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            raise CliError(
                explain(error, service, target, self.operation_id, self.settings.timeout)
            ) from error

    async def administrator_call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req
    ) -> Resp:
        return await self.call(Service.ADMINISTRATOR, method, request)

    async def license_server(self, address: str | None = None) -> LicenseServerLink:
        """The first License Server of ``address`` (default: the setting) that answers."""
        address = address or self.settings.license_server.value
        if self._license_server is not None and self._license_server.address == address:
            return self._license_server
        try:
            servers = parse_address(address)
        except InvalidLicenseServerAddress as error:
            raise InvalidAddress(error.message) from error
        tried: list[str] = []
        for server in servers:
            for target in server.targets():
                channel = self.channel(target)
                trusted_storage = license_pb2_grpc.TrustedStorageServiceStub(channel)
                try:
                    identity = await trusted_storage.GetHostIdentity(
                        license_pb2.GetHostIdentityRequest(),
                        timeout=min(PROBE_TIMEOUT, self.settings.timeout),
                    )
                except grpc.aio.AioRpcError as error:
                    tried.append(f"{target} ({error.code().name.lower()})")
                    continue
                link = LicenseServerLink(
                    address=address,
                    target=target,
                    host_id=identity.host_id,
                    leases=license_pb2_grpc.LeaseServiceStub(channel),
                    trusted_storage=trusted_storage,
                    lease_admin=license_pb2_grpc.LeaseAdminServiceStub(channel),
                )
                self._license_server = link
                return link
        raise CliError(
            Failure(
                ExitCode.UNREACHABLE,
                f"no License Server answers at {address}",
                f"Tried {_summary(tried)}. Is the License Server running? Its address is set "
                "with --license-server / TESSERA_LICENSE_SERVER; `tessera config` shows the "
                "one in use. One that serves TLS needs --tls-ca (and --tls-cert/--tls-key for "
                "mutual TLS).",
                code="UNAVAILABLE",
                reason="UNREACHABLE",
                service=Service.LICENSE_SERVER.value,
            )
        )

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def _summary(tried: Sequence[str]) -> str:
    if len(tried) <= 3:
        return ", ".join(tried)
    return f"{', '.join(tried[:2])} … {tried[-1]} ({len(tried)} targets)"
