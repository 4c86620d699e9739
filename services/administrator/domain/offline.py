"""Air-gapped sites: the request travels to the vendor as a file, the answer comes back
as one (FlexNet's offline activation; DOMAIN: the License Server needs the Internet only
while activating, returning or repairing, and not even then with files).

1. ``export_request`` on the site's Administrator: the License Server prepares, exactly
   as online step 1; the journal records the operation as offline and PREPARED.
2. ``submit_request`` on any Administrator with Internet access (no License Server
   needed) takes the file to the Activation Server and writes the answer file.
3. ``import_response`` on the site's Administrator installs the answer on the License
   Server that asked (checked here before anything is sent to it) and completes the
   journaled operation. Importing again changes nothing and tells the same result.

The journal is what ties an answer to its operation, so an answer is imported through
the Administrator that exported the request. Nothing in the file is journaled before
the License Server has verified and installed it: a refused file (forged, altered,
rewritten to another operation, for another License Server) changes nothing, and the
genuine file still completes the operation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from services.administrator.domain import inputs
from services.administrator.domain.errors import (
    DamagedFile,
    OperationNotFound,
    ResponseForAnotherHost,
    ResponseMismatch,
)
from services.administrator.domain.exchange import Exchange, ExchangeRunner
from services.administrator.domain.journal import OperationJournal
from services.administrator.domain.model import Intent, Operation, OperationKind
from services.administrator.domain.offline_files import (
    FORMAT_VERSION,
    REQUEST,
    RESPONSE,
    file_name,
    read_request_file,
    read_response_file,
    write_request_file,
    write_response_file,
)
from services.administrator.domain.registration import (
    Registrations,
    checked_registration,
    registration_to_proto,
)
from tessera.admin.v1 import admin_pb2 as pb
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.errors import InvalidInput

log = logging.getLogger("tessera.administrator")

# What travels by file, in the files' own words (tessera.admin.v1.OperationKind).
KINDS = {
    pb.OPERATION_KIND_ACTIVATE: OperationKind.ACTIVATE,
    pb.OPERATION_KIND_RETURN: OperationKind.RETURN,
    pb.OPERATION_KIND_REPAIR: OperationKind.REPAIR,
}
PROTO_KINDS = {kind: number for number, kind in KINDS.items()}


@dataclass(frozen=True)
class Exported:
    operation: Operation
    request_file: bytes
    file_name: str


@dataclass(frozen=True)
class Submitted:
    response_file: bytes
    file_name: str


def _unused(kind: OperationKind, **fields: object) -> None:
    for field, value in fields.items():
        if value:
            raise InvalidInput(field, f"is not part of a {kind.value} request; leave it empty")


def export_intent(
    kind: int,
    license_server: str,
    activation_id: str,
    count: int,
    certificate_id: str,
    force: bool,
) -> Intent:
    """What an ExportRequest asks for; only the fields its kind uses may be set."""
    operation_kind = KINDS.get(pb.OperationKind.ValueType(kind))
    if operation_kind is None:
        raise InvalidInput("kind", "must be ACTIVATE, RETURN or REPAIR")
    license_server = inputs.license_server(license_server)
    if operation_kind is OperationKind.ACTIVATE:
        _unused(operation_kind, certificate_id=certificate_id, force=force)
        return Intent(
            kind=operation_kind,
            license_server=license_server,
            activation_id=inputs.activation_id(activation_id),
            count=inputs.seats(count),
            offline=True,
        )
    if operation_kind is OperationKind.RETURN:
        _unused(operation_kind, activation_id=activation_id)
        return Intent(
            kind=operation_kind,
            license_server=license_server,
            certificate_id=inputs.certificate_id(certificate_id),
            count=inputs.seats_to_return(count),
            force=force,
            offline=True,
        )
    _unused(operation_kind, activation_id=activation_id, count=count, certificate_id=certificate_id)
    # A forced repair runs even on healthy trusted storage (and counts at the vendor).
    return Intent(kind=operation_kind, license_server=license_server, force=force, offline=True)


def _kind_of(number: int, field: str) -> OperationKind:
    kind = KINDS.get(pb.OperationKind.ValueType(number))
    if kind is None:
        raise DamagedFile(field, f"is for operation kind {number}, which travels by no file")
    return kind


def _file_operation_id(text: str, field: str) -> str:
    if not inputs.OPERATION_ID.match(text):
        raise DamagedFile(field, "names no valid operation id")
    return text


class Offline:
    """Operations whose request and answer travel as files."""

    def __init__(
        self,
        journal: OperationJournal,
        runner: ExchangeRunner,
        exchanges: Mapping[OperationKind, Exchange],
        registrations: Registrations,
    ) -> None:
        self.journal = journal
        self.runner = runner
        self.exchanges = exchanges
        self.registrations = registrations

    async def export_request(
        self,
        kind: int,
        license_server: str,
        activation_id: str,
        count: int,
        certificate_id: str,
        force: bool,
        operation_id: str,
    ) -> Exported:
        """Prepare on the License Server and write the signed request as a file;
        exporting again with the same operation id writes the same request."""
        intent = export_intent(kind, license_server, activation_id, count, certificate_id, force)
        operation_id = inputs.operation_id(operation_id)
        exchange = self.exchanges[intent.kind]
        async with self.journal.exclusive(operation_id):
            operation = await self.journal.existing(operation_id, intent)
            if operation is None:
                async with self.runner.license_servers.connected(intent.license_server) as server:
                    operation = await self.runner.prepare(exchange, server, intent, operation_id)
        request_file = pb.RequestFile(
            format_version=FORMAT_VERSION,
            kind=PROTO_KINDS[operation.kind],
            operation_id=operation.operation_id,
            request=SignedEnvelope.FromString(operation.request_envelope),
            registration=await self.registrations.for_vendor(),
        )
        return Exported(
            operation,
            write_request_file(request_file, operation.kind, operation.host_id),
            file_name(operation.kind, operation.operation_id, REQUEST),
        )

    async def submit_request(self, data: bytes) -> Submitted:
        """Take a request file to the Activation Server; the vendor's answer as a file.
        A refused return is an answer too: carried back, it lets the seats serve again."""
        field = "request_file"
        request_file = read_request_file(data, field)
        kind = _kind_of(request_file.kind, field)
        operation_id = _file_operation_id(request_file.operation_id, field)
        exchange = self.exchanges[kind]
        request = request_file.request
        expected = exchange.request_type.DESCRIPTOR.full_name
        if request.payload_type != expected:
            raise DamagedFile(
                field,
                f"is a {kind.value} request file but carries "
                f"{request.payload_type or 'no signed request'}",
            )
        document = exchange.request_type()
        try:
            document.ParseFromString(request.payload)
        except DecodeError as error:
            raise DamagedFile(field, "its signed request does not parse") from error
        registration = checked_registration(
            request_file.registration, required=False, field=f"{field}.registration"
        )
        response = await exchange.ask_vendor(request, registration_to_proto(registration))
        host_id = str(getattr(document, "host_id", ""))
        log.info("submitted %s request %s of host %s", kind.value, operation_id, host_id)
        response_file = pb.ResponseFile(
            format_version=FORMAT_VERSION,
            kind=request_file.kind,
            operation_id=operation_id,
            response=response,
        )
        return Submitted(
            write_response_file(response_file, kind, host_id),
            file_name(kind, operation_id, RESPONSE),
        )

    async def import_response(self, license_server: str, data: bytes) -> Operation:
        """Install an answer file on the License Server that asked for it and complete
        the journaled operation; raises the vendor's refusal of a refused one."""
        field = "response_file"
        license_server = inputs.license_server(license_server)
        response_file = read_response_file(data, field)
        kind = _kind_of(response_file.kind, field)
        operation_id = _file_operation_id(response_file.operation_id, field)
        exchange = self.exchanges[kind]
        response = response_file.response
        expected = exchange.response_type.DESCRIPTOR.full_name
        if response.payload_type != expected:
            raise DamagedFile(
                field,
                f"is a {kind.value} response file but carries "
                f"{response.payload_type or 'no signed answer'}",
            )
        try:
            request_id, host_id = exchange.addressee(response)
        except DecodeError as error:
            raise DamagedFile(field, "its signed answer does not parse") from error

        # Until the License Server has installed the answer, the journal is only read: a
        # refusal here, or by the License Server, leaves the operation as it was.
        async with self.journal.exclusive(operation_id):
            operation = await self.journal.find(operation_id)
            if operation is None:
                raise OperationNotFound(
                    f"no operation {operation_id!r} in this Administrator's journal: a "
                    f"response is imported through the Administrator that exported its "
                    f"request (the file answers {kind.value} request {request_id!r} of "
                    f"host {host_id}); import it there",
                    metadata={"operation_id": operation_id, "host_id": host_id},
                )
            if operation.kind is not kind or operation.request_id != request_id:
                raise ResponseMismatch(
                    f"the file answers {kind.value} request {request_id!r}, but operation "
                    f"{operation_id} is {operation.kind.value} request {operation.request_id!r}",
                    metadata={"operation_id": operation_id},
                )
            if host_id != operation.host_id:
                raise ResponseForAnotherHost(
                    f"the file answers host {host_id}, but operation {operation_id} was "
                    f"prepared on host {operation.host_id}",
                    metadata={"host_id": host_id},
                )
            async with self.runner.license_servers.connected(license_server) as server:
                # Asked of a finished operation too: an answer installed on its own
                # License Server never "completes" on another.
                if server.host_id != operation.host_id:
                    raise ResponseForAnotherHost(
                        f"the file answers a request of host {operation.host_id}, but "
                        f"{license_server} is host {server.host_id}; import it on the License "
                        "Server that exported the request",
                        metadata={"host_id": operation.host_id},
                    )
                if operation.state.finished:
                    return self.runner.outcome(exchange, operation)
                installed = await exchange.install(server, operation, response)
                operation = await self.runner.installed(exchange, operation, response, installed)
                return self.runner.outcome(exchange, operation)
