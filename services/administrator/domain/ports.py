"""What the Administrator's flows need from the world, as Protocols.

The flows broker between two kinds of peers, the vendor's Activation Server and the
customer's License Servers, and keep a journal; they name only these ports. ``peers.py``
implements the peer ports over gRPC and ``store/`` the journal over SQL; ``server.py``
plugs them in. A test can plug in fakes and run a flow without any live service.

A peer's failure reaches the flows as a domain error: ``PeerUnavailable`` when it cannot
be reached, ``PeerRefused`` (its own status code and reason) when it says no.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from services.administrator.domain.model import (
    Operation,
    OperationState,
    OperationUpdate,
    Registration,
)
from tessera.activation.v1 import activation_pb2 as activation_pb
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.license.v1 import license_pb2 as license_pb

# How the peers are named in the metadata of their errors ("peer").
ACTIVATION_SERVER = "Activation Server"
LICENSE_SERVER = "License Server"


class Vendor(Protocol):
    """The vendor's Activation Server: it decides on host-signed requests and answers
    with vendor-signed envelopes (the same request id always gets the same answer)."""

    async def get_order(self, entitlement_id: str) -> activation_pb.Entitlement:
        """An order (entitlement) and its lines."""
        ...

    async def activate(
        self, request: SignedEnvelope, registration: activation_pb.Registration
    ) -> SignedEnvelope:
        """The signed VendorActivationResponse to a host-signed activation request."""
        ...

    async def return_seats(self, request: SignedEnvelope) -> SignedEnvelope:
        """The signed VendorReturnReceipt (credited or refused) to a return request."""
        ...

    async def repair(self, request: SignedEnvelope) -> SignedEnvelope:
        """The signed VendorRepairResponse re-issuing what the host holds."""
        ...

    async def check_in(self, request: SignedEnvelope) -> SignedEnvelope:
        """The signed VendorCheckInResult to a host-signed check-in."""
        ...


class LicenseServer(Protocol):
    """One License Server, reached at ``address``, which answered as host ``host_id``.
    It signs requests with its host key and verifies and installs the vendor's answers
    (installing the same answer twice is a no-op)."""

    address: str
    host_id: str

    async def list_certificates(self) -> list[license_pb.InstalledCertificate]: ...

    async def license_information(self) -> list[license_pb.FeatureInformation]: ...

    async def prepare_activation(
        self, activation_id: str, count: int, request_id: str
    ) -> license_pb.PrepareActivationResponse: ...

    async def install_activation(
        self, response: SignedEnvelope
    ) -> license_pb.InstallActivationResponse: ...

    async def prepare_return(
        self, certificate_id: str, count: int, request_id: str, force: bool
    ) -> license_pb.PrepareReturnResponse:
        """Sign a return request; the seats stop serving until the receipt is installed."""
        ...

    async def complete_return(
        self, receipt: SignedEnvelope
    ) -> license_pb.CompleteReturnResponse: ...

    async def prepare_repair(
        self, request_id: str, force: bool = False
    ) -> license_pb.PrepareRepairResponse: ...

    async def complete_repair(
        self, response: SignedEnvelope
    ) -> license_pb.CompleteRepairResponse: ...

    async def prepare_check_in(self, only_if_due: bool) -> license_pb.PrepareCheckInResponse: ...

    async def complete_check_in(
        self, result: SignedEnvelope
    ) -> license_pb.CompleteCheckInResponse: ...

    async def close(self) -> None: ...


class LicenseServerDirectory(Protocol):
    """How the flows reach the License Server at an address (``port@host``, several
    separated by ``;``): the first that answers."""

    async def connect(self, address: str) -> LicenseServer:
        """A connection the caller closes; PeerUnavailable when none answers."""
        ...

    def connected(self, address: str) -> AbstractAsyncContextManager[LicenseServer]:
        """The License Server at ``address`` for the duration of a block."""
        ...


class DuplicateOperation(Exception):
    """Another call journaled this operation id first."""


class JournalQueries(Protocol):
    """What one transaction on the journal can do. Updates are conditional: they return
    False when another call changed the operation first (states never go back)."""

    async def get(self, operation_id: str) -> Operation | None: ...

    async def insert(self, operation: Operation) -> None:
        """Journal a new operation; DuplicateOperation when its id is taken. A move's
        halves are inserted in the move's transaction."""
        ...

    async def advance(
        self,
        operation_id: str,
        from_states: Collection[OperationState],
        step: OperationUpdate,
    ) -> bool:
        """Journal ``step`` if the operation still stands in one of ``from_states``."""
        ...

    async def record_error(
        self, operation_id: str, last_error: str, code: str, at: dt.datetime
    ) -> None: ...

    async def list_operations(self, limit: int, unfinished_only: bool) -> list[Operation]:
        """Newest first; a move's halves are not listed (the move is)."""
        ...

    async def license_server_addresses(self) -> list[str]:
        """Every License Server address an operation named, sorted."""
        ...

    async def unfinished_online(self) -> list[Operation]:
        """Operations to resume at start, oldest first (not a move's halves, nor those
        waiting for a response file)."""
        ...

    async def get_registration(self) -> Registration | None: ...

    async def put_registration(self, details: Registration, at: dt.datetime) -> None: ...


class JournalStore(Protocol):
    """The journal's database; the flows own each transaction
    (``async with store.transaction() as journal``)."""

    def transaction(self) -> AbstractAsyncContextManager[JournalQueries]: ...
