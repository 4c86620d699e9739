"""LicenseClient: what an Enterprise Server, a WorkStation or a tool holds its licenses with.

::

    async with LicenseClient("@localhost", display_name="WorkStation 6.0") as client:
        async with client.lease("client.station") as lease:
            ...  # the lease heartbeats, resumes and fails over by itself
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, Unpack

import grpc
from nacl.signing import VerifyKey

from clients import startup
from clients.errors import (
    InvalidLicenseServerConfiguration,
    LicenseServerUnreachable,
    error_from_rpc,
)
from clients.lease import Lease
from clients.license import EventCallback, License
from clients.settings import ClientKeywords, ClientOptions, ClientSettings, options_with
from clients.transport import connected
from tessera.address import parse_address
from tessera.errors import InvalidLicenseServerAddress
from tessera.keys import read_vendor_public_keys
from tessera.license.v1 import license_pb2 as pb
from tessera.license.v1 import license_pb2_grpc as pb_grpc
from tessera.local_licenses import LocalLicenseStore

Reply = TypeVar("Reply")


@dataclass(frozen=True)
class FeatureInformation:
    """EBO's License Information for one feature on a License Server."""

    feature: str
    activated: int
    used: int
    available: int
    queued: int
    required: int
    #: More seats required than activated: EBO's license violation alarm.
    violation: bool


class LicenseClient:
    """Holds licenses from the License Servers of one address.

    ``address`` is written as EBO and FlexNet write it: ``27000@host``, ``@host`` (ports
    27000-27009), several separated by ``;``; ``@localhost`` is the recommended setup. An
    empty or unparsable address raises InvalidLicenseServerConfiguration here, before any
    network call.

    With ``local_licenses`` (a LocalLicenseStore or its directory) and ``vendor_keys`` (a
    mapping of key id to key, or the path of ``vendor-keys.pub``), ``license()`` applies
    EBO's start-up rule: a valid local license first, else a network lease.

    With ``tls`` (a ClientTls: the CA to trust, and a client certificate and key when the
    License Server asks for mutual TLS) every connection is TLS; without it, plaintext.
    ``site_token`` is presented on every call, for a License Server that requires one.
    These and the other settings are ClientOptions' fields (documented and defaulted
    there), given as one ``options`` value or as keyword arguments.

    Use it as ``async with``, or call ``close()``: that checks in every license still
    held.
    """

    def __init__(
        self,
        address: str,
        options: ClientOptions | None = None,
        **keywords: Unpack[ClientKeywords],
    ) -> None:
        """``options`` (a ClientOptions) or its fields as keyword arguments, which win
        over the same fields of ``options`` when both are given."""
        try:
            servers = parse_address(address)
        except InvalidLicenseServerAddress as error:
            raise InvalidLicenseServerConfiguration(error.message) from None
        self.options = options_with(options, keywords)
        self.settings = ClientSettings.of(address, tuple(servers), self.options)
        self.client_host = self.options.client_host or socket.gethostname()
        self.user = self.options.user
        self.display_name = self.options.display_name
        local_licenses = self.options.local_licenses
        if isinstance(local_licenses, str | os.PathLike):
            local_licenses = LocalLicenseStore(Path(local_licenses))
        self.local_licenses = local_licenses
        vendor_keys = self.options.vendor_keys
        if isinstance(vendor_keys, str | os.PathLike):
            vendor_keys = read_vendor_public_keys([Path(vendor_keys)])
        self.vendor_keys: Mapping[str, VerifyKey] = vendor_keys or {}
        if local_licenses is not None and not self.vendor_keys:
            raise ValueError("local_licenses needs vendor_keys to verify the licenses with")
        self._licenses: set[License] = set()

    @property
    def address(self) -> str:
        return self.settings.address

    async def __aenter__(self) -> LicenseClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Check in every license this client still holds."""
        held = [license for license in self._licenses if license.held]
        await asyncio.gather(*(license.release() for license in held), return_exceptions=True)
        self._licenses.clear()

    # Network leases

    @contextlib.asynccontextmanager
    async def lease(
        self,
        feature: str,
        count: int = 1,
        *,
        ttl: float | None = None,
        wait: float | None = None,
        on_event: EventCallback | None = None,
    ) -> AsyncIterator[Lease]:
        """``async with`` a network lease of ``count`` seats of ``feature``; checked in on
        exit, also when the block is cancelled. See ``acquire`` for the arguments."""
        lease = await self.acquire(feature, count, ttl=ttl, wait=wait, on_event=on_event)
        try:
            yield lease
        finally:
            await lease.release()

    async def acquire(
        self,
        feature: str,
        count: int = 1,
        *,
        ttl: float | None = None,
        wait: float | None = None,
        on_event: EventCallback | None = None,
    ) -> Lease:
        """Take ``count`` seats of ``feature`` (all or nothing) from the first License
        Server of the address that grants them; release them with ``release()``.

        ``ttl`` asks for a shorter lease TTL than the server's (seconds); ``wait`` joins
        the feature's queue for up to that many seconds when no seat is free (``Queued``
        events tell the position). ``on_event`` is called with every LeaseEvent (it may
        be a coroutine function). Raises NoSeatAvailable, FeatureNotLicensed, …, or
        LicenseServerUnreachable.
        """
        request = pb.LeaseAcquire(
            feature=feature,
            count=count,
            client_host=self.client_host,
            user=self.user,
            display_name=self.display_name,
        )
        if ttl is not None:
            request.ttl.FromMilliseconds(round(ttl * 1000))
        if wait is not None:
            request.wait_timeout.FromMilliseconds(round(wait * 1000))
        lease = await Lease.acquire(self.settings, request, wait, on_event)
        self._track(lease)
        return lease

    # The start-up rule: local license, else network lease, else refusal

    @contextlib.asynccontextmanager
    async def license(
        self,
        feature: str,
        count: int = 1,
        *,
        ttl: float | None = None,
        wait: float | None = None,
        on_event: EventCallback | None = None,
    ) -> AsyncIterator[License]:
        """``async with`` a license by EBO's start-up rule (see ``check_out``)."""
        license = await self.check_out(feature, count, ttl=ttl, wait=wait, on_event=on_event)
        try:
            yield license
        finally:
            await license.release()

    async def check_out(
        self,
        feature: str,
        count: int = 1,
        *,
        ttl: float | None = None,
        wait: float | None = None,
        on_event: EventCallback | None = None,
    ) -> License:
        """A valid local license of ``feature`` first, else a network lease; NoLicense
        (saying why for both) when there is neither, and the application decides."""
        license = await startup.check_out(
            self.local_licenses,
            self.vendor_keys,
            feature,
            count,
            lambda: self.acquire(feature, count, ttl=ttl, wait=wait, on_event=on_event),
            on_event,
        )
        self._track(license)
        return license

    # License Information and requirements

    async def declare_requirement(self, feature: str, required: int) -> None:
        """Tell the License Server how many seats of ``feature`` this client needs (e.g. an
        Enterprise Server with 40 field-bus devices); 0 withdraws it. License
        Information then shows the violation flag when fewer are activated."""
        request = pb.DeclareRequirementRequest(
            client_host=self.client_host, feature=feature, required=required
        )
        await self._unary(
            lambda stub, timeout: stub.DeclareRequirement(
                request, timeout=timeout, metadata=self.settings.metadata
            )
        )

    async def license_information(self, feature: str = "") -> list[FeatureInformation]:
        """Per feature: Activated, Used, Available, Queued, Required, violation."""
        request = pb.GetLicenseInformationRequest(feature=feature)
        reply = await self._unary(
            lambda stub, timeout: stub.GetLicenseInformation(
                request, timeout=timeout, metadata=self.settings.metadata
            )
        )
        return [
            FeatureInformation(
                feature=info.feature,
                activated=info.activated,
                used=info.used,
                available=info.available,
                queued=info.queued,
                required=info.required,
                violation=info.violation,
            )
            for info in reply.features
        ]

    # Plumbing

    def _track(self, license: License) -> None:
        self._licenses = {held for held in self._licenses if held.held}
        self._licenses.add(license)

    async def _unary(
        self, call: Callable[[pb_grpc.LeaseServiceAsyncStub, float], Awaitable[Reply]]
    ) -> Reply:
        """``call(stub, timeout)`` on the first License Server of the address that answers."""
        attempts: list[str] = []
        for target in self.settings.targets:
            try:
                async with connected(
                    target, self.settings.connect_timeout, self.settings.tls
                ) as channel:
                    return await call(pb_grpc.LeaseServiceStub(channel), self.settings.call_timeout)
            except LicenseServerUnreachable as error:
                attempts.append(f"{target}: {error.message}")
            except grpc.aio.AioRpcError as rpc_error:
                refusal = error_from_rpc(rpc_error, target)
                if not isinstance(refusal, LicenseServerUnreachable):
                    raise refusal from None
                attempts.append(f"{target}: {refusal.message}")
        raise LicenseServerUnreachable(
            f"no License Server answers at {self.address!r}", attempts=attempts
        )
