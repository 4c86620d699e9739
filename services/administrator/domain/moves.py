"""Move: return a whole certificate from one License Server, then activate the same line
and seats on another (replacing hardware, EcoStruxure's "move"). One journaled operation.

The two halves are a return and an activation with request ids derived from the
operation id ("<operation>.return", "<operation>.activate"), so every step is idempotent
on its peer and the operation can resume after a crash at any step. The journal records
each step before the next:

    PREPARED   the source signed the return (its seats stopped serving)
    ANSWERED   the source verified and installed the vendor's receipt (journaled with
               it); then the target signed the activation request (journaled)
    COMPLETED  the target verified and installed the vendor's certificate (journaled
               with it)
    REFUSED    the vendor refused the return: the seats serve on the source again and
               nothing is activated on the target

A vendor answer is journaled only once the License Server it is for has installed it
(the Administrator holds no vendor keys; see exchange.py): until then, asked again, the
vendor gives the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.administrator.domain import inputs
from services.administrator.domain.activations import ActivationExchange, installed_certificate
from services.administrator.domain.errors import CertificateNotFound, SameLicenseServer
from services.administrator.domain.exchange import ExchangeRunner, check_host, reach
from services.administrator.domain.journal import OperationJournal
from services.administrator.domain.model import (
    Intent,
    Operation,
    OperationKind,
    OperationState,
)
from services.administrator.domain.registration import Registrations
from services.administrator.domain.returns import ReturnExchange, refusal_in
from tessera.clock import Clock
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.license.v1.license_pb2 import InstalledCertificate

RETURN_STEP = ".return"
ACTIVATE_STEP = ".activate"
# The steps' request ids must fit the License Server's 128 characters.
MAX_MOVE_OPERATION_ID = inputs.MAX_OPERATION_ID - len(ACTIVATE_STEP)


@dataclass(frozen=True)
class Moved:
    operation: Operation
    # The certificate installed on the target License Server.
    certificate: InstalledCertificate


class Moves:
    """Move a certificate's seats from one License Server to another."""

    def __init__(
        self,
        journal: OperationJournal,
        runner: ExchangeRunner,
        returns: ReturnExchange,
        activations: ActivationExchange,
        registrations: Registrations,
        clock: Clock,
    ) -> None:
        self.journal = journal
        self.runner = runner
        self.returns = returns
        self.activations = activations
        self.registrations = registrations
        self.clock = clock

    async def move(
        self,
        from_license_server: str,
        to_license_server: str,
        certificate_id: str,
        force: bool,
        operation_id: str,
    ) -> Moved:
        """Move a whole certificate, exactly once; raises the vendor's refusal of the
        return (then nothing was activated)."""
        intent = Intent(
            kind=OperationKind.MOVE,
            license_server=inputs.license_server(from_license_server, "from_license_server"),
            target_license_server=inputs.license_server(to_license_server, "to_license_server"),
            certificate_id=inputs.certificate_id(certificate_id),
            force=force,
        )
        operation_id = inputs.operation_id(operation_id, MAX_MOVE_OPERATION_ID)
        async with self.journal.exclusive(operation_id):
            operation = await self.journal.existing(operation_id, intent)
            if operation is None:
                operation = await self._begin(intent, operation_id)
            operation = await self._complete(operation)
        return Moved(
            operation,
            installed_certificate(operation.result, operation.target_response_envelope),
        )

    async def resume(self, operation_id: str) -> Operation:
        async with self.journal.exclusive(operation_id):
            return await self._complete(await self.journal.get(operation_id))

    async def _begin(self, intent: Intent, operation_id: str) -> Operation:
        """Both License Servers answer, the certificate is on the source: withhold its
        seats there and journal the move."""
        async with (
            self.runner.license_servers.connected(intent.license_server) as source,
            self.runner.license_servers.connected(intent.target_license_server) as target,
        ):
            if source.host_id == target.host_id:
                raise SameLicenseServer(
                    f"{intent.license_server} and {intent.target_license_server} are the same "
                    f"License Server (host {source.host_id})",
                    metadata={"host_id": source.host_id},
                )
            held = {
                installed.certificate.certificate_id: installed.certificate
                for installed in await source.list_certificates()
            }
            certificate = held.get(intent.certificate_id)
            if certificate is None:
                raise CertificateNotFound(
                    f"{intent.license_server} (host {source.host_id}) holds no certificate "
                    f"{intent.certificate_id}",
                    metadata={"certificate_id": intent.certificate_id},
                )
            whole = Intent(
                kind=OperationKind.RETURN,
                certificate_id=intent.certificate_id,
                count=0,
                force=intent.force,
            )
            prepared = await self.returns.prepare(source, whole, operation_id + RETURN_STEP)
            now = self.clock.now()
            operation = await self.journal.start(
                Operation(
                    operation_id=operation_id,
                    kind=OperationKind.MOVE,
                    state=OperationState.PREPARED,
                    license_server=intent.license_server,
                    host_id=source.host_id,
                    activation_id=certificate.activation_id,
                    count=certificate.count,
                    request_id=prepared.request_id,
                    request_envelope=prepared.request.SerializeToString(),
                    response_envelope=None,
                    created_at=now,
                    updated_at=now,
                    certificate_id=intent.certificate_id,
                    force=intent.force,
                    target_license_server=intent.target_license_server,
                    target_host_id=target.host_id,
                    revoked_leases=prepared.revoked_leases,
                )
            )
        reach(operation, "after_prepare")
        return operation

    async def _complete(self, operation: Operation) -> Operation:
        """The remaining steps, from wherever the journal says the move stands."""
        if operation.state is OperationState.PREPARED:
            receipt = await self.runner.ask_vendor(self.returns, operation)
            operation = await self._return_from_source(operation, receipt)
        elif (
            operation.state is OperationState.ANSWERED and operation.target_request_envelope is None
        ):
            assert operation.response_envelope is not None
            receipt = SignedEnvelope.FromString(operation.response_envelope)
            operation = await self._return_from_source(operation, receipt)
        if operation.state is OperationState.ANSWERED:
            if operation.target_response_envelope is None:
                answer = await self._ask_vendor_to_activate(operation)
            else:  # journaled by an older Administrator before it was installed
                answer = SignedEnvelope.FromString(operation.target_response_envelope)
            operation = await self._install_on_target(operation, answer)
        return self.runner.outcome(self.returns, operation)

    async def _return_from_source(self, operation: Operation, receipt: SignedEnvelope) -> Operation:
        """The source verifies and installs the vendor's receipt (installing it again is
        a no-op), which is journaled then; if credited, the target signs the activation
        request for the same line and seats."""
        async with (
            self.journal.noting_errors(operation),
            self.runner.license_servers.connected(operation.license_server) as source,
        ):
            check_host(source, operation.host_id, operation.operation_id)
            completed = await source.complete_return(receipt)
        reach(operation, "after_return")
        if not completed.credited:
            return await self.journal.refuse(
                operation,
                refusal_in(receipt, operation),
                result=completed.SerializeToString(),
                response_envelope=receipt.SerializeToString(),
            )
        if operation.state is OperationState.PREPARED:
            operation = await self.journal.advance(
                operation, OperationState.ANSWERED, response_envelope=receipt.SerializeToString()
            )
            if operation.state is not OperationState.ANSWERED:
                return operation  # another call took the move further meanwhile
        async with (
            self.journal.noting_errors(operation),
            self.runner.license_servers.connected(operation.target_license_server) as target,
        ):
            check_host(target, operation.target_host_id, operation.operation_id)
            prepared = await target.prepare_activation(
                operation.activation_id, operation.count, operation.operation_id + ACTIVATE_STEP
            )
        operation = await self.journal.fill(
            operation,
            "target_request_envelope",
            prepared.request.SerializeToString(),
            target_request_id=prepared.request_id,
        )
        reach(operation, "after_target_prepare")
        return operation

    async def _ask_vendor_to_activate(self, operation: Operation) -> SignedEnvelope:
        """The vendor's certificate for the target (not journaled: unverified until the
        target installs it)."""
        assert operation.target_request_envelope is not None
        request = SignedEnvelope.FromString(operation.target_request_envelope)
        registration = await self.registrations.for_vendor()
        # A refusal here is not the end: the seats already left the source, so the move
        # stays unfinished (last_error says why) until the vendor activates them.
        async with self.journal.noting_errors(operation):
            answer = await self.activations.ask_vendor(request, registration)
        reach(operation, "after_target_vendor")
        return answer

    async def _install_on_target(self, operation: Operation, answer: SignedEnvelope) -> Operation:
        """The target verifies and installs the certificate; journaled with it."""
        async with (
            self.journal.noting_errors(operation),
            self.runner.license_servers.connected(operation.target_license_server) as target,
        ):
            check_host(target, operation.target_host_id, operation.operation_id)
            installed = await target.install_activation(answer)
        reach(operation, "after_install")
        return await self.journal.advance(
            operation,
            OperationState.COMPLETED,
            result=installed.SerializeToString(),
            target_response_envelope=answer.SerializeToString(),
        )
