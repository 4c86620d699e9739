"""Move: return a whole certificate from one License Server, then activate the same line
and seats on another (replacing hardware, EcoStruxure's "move").

A move is a parent operation of two child operations, its halves: a return on the
source ("<operation>.return") and an activation on the target ("<operation>.activate"),
each run by the same exchange runner as an ordinary return or activation, so every step
is idempotent on its peer and the move can resume after a crash at any step. All three
are journaled together once the source has signed the return; the activation waits,
PLANNED, until the vendor has credited the seats back. The move's own state:

    PREPARED   the return is under way (the source's seats stopped serving)
    ANSWERED   the return is done: the source installed the vendor's receipt; the
               activation on the target is under way
    COMPLETED  the target verified and installed the vendor's certificate
    REFUSED    the vendor refused the return: the seats serve on the source again and
               nothing is activated on the target

A vendor answer is journaled only once the License Server it is for has installed it
(the Administrator holds no vendor keys; see exchange.py): until then, asked again, the
vendor gives the same answer. A failure of either half is noted on the move too.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.administrator.domain import inputs
from services.administrator.domain.activations import ActivationExchange, installed_certificate
from services.administrator.domain.errors import CertificateNotFound, SameLicenseServer
from services.administrator.domain.exchange import Exchange, ExchangeRunner, reach
from services.administrator.domain.journal import OperationJournal
from services.administrator.domain.model import (
    Intent,
    Operation,
    OperationKind,
    OperationState,
)
from services.administrator.domain.returns import ReturnExchange, refusal_in
from tessera.clock import Clock
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.license.v1.license_pb2 import InstalledCertificate

RETURN_STEP = ".return"
ACTIVATE_STEP = ".activate"
# The steps' request ids must fit the License Server's 128 characters.
MAX_MOVE_OPERATION_ID = inputs.MAX_OPERATION_ID - len(ACTIVATE_STEP)


class ReturnHalf(ReturnExchange):
    """A move's first half: the whole certificate goes back from the source. Its steps
    are the move's failpoints (``administrator.move.<step>``)."""

    def reach(self, operation: Operation, step: str) -> None:
        if step == "after_install":
            reach(operation, "after_return")
        else:
            super().reach(operation, step)


class ActivationHalf(ActivationExchange):
    """A move's second half: the same line and seats onto the target."""

    # The seats already left the source: a vendor refusal leaves the move unfinished
    # (last_error says why) until the vendor activates them.
    refusal_is_final = False

    def reach(self, operation: Operation, step: str) -> None:
        if step == "after_prepare":
            reach(operation, "after_target_prepare")
        elif step == "after_vendor":
            reach(operation, "after_target_vendor")
        else:
            reach(operation, "after_install")


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
        return_half: ReturnHalf,
        activation_half: ActivationHalf,
        clock: Clock,
    ) -> None:
        self.journal = journal
        self.runner = runner
        self.return_half = return_half
        self.activation_half = activation_half
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
            activated = await self.journal.get(operation_id + ACTIVATE_STEP)
        return Moved(
            operation, installed_certificate(activated.result, activated.response_envelope)
        )

    async def resume(self, operation_id: str) -> Operation:
        async with self.journal.exclusive(operation_id):
            return await self._complete(await self.journal.get(operation_id))

    async def _begin(self, intent: Intent, operation_id: str) -> Operation:
        """Both License Servers answer, the certificate is on the source: withhold its
        seats there and journal the move with its halves."""
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
                license_server=intent.license_server,
                certificate_id=intent.certificate_id,
                count=0,
                force=intent.force,
            )
            prepared = await self.return_half.prepare(source, whole, operation_id + RETURN_STEP)
            now = self.clock.now()
            move = Operation(
                operation_id=operation_id,
                kind=OperationKind.MOVE,
                state=OperationState.PREPARED,
                license_server=intent.license_server,
                host_id=source.host_id,
                activation_id=certificate.activation_id,
                count=certificate.count,
                request_id=prepared.request_id,
                request_envelope=b"",
                response_envelope=None,
                created_at=now,
                updated_at=now,
                certificate_id=intent.certificate_id,
                force=intent.force,
                target_license_server=intent.target_license_server,
                target_host_id=target.host_id,
                revoked_leases=prepared.revoked_leases,
            )
            returning = Operation(
                operation_id=operation_id + RETURN_STEP,
                kind=OperationKind.RETURN,
                state=OperationState.PREPARED,
                license_server=intent.license_server,
                host_id=source.host_id,
                activation_id="",
                count=0,
                request_id=prepared.request_id,
                request_envelope=prepared.request.SerializeToString(),
                response_envelope=None,
                created_at=now,
                updated_at=now,
                certificate_id=intent.certificate_id,
                force=intent.force,
                revoked_leases=prepared.revoked_leases,
                parent_operation_id=operation_id,
            )
            activating = Operation(
                operation_id=operation_id + ACTIVATE_STEP,
                kind=OperationKind.ACTIVATE,
                state=OperationState.PLANNED,
                license_server=intent.target_license_server,
                host_id=target.host_id,
                activation_id=certificate.activation_id,
                count=certificate.count,
                request_id=operation_id + ACTIVATE_STEP,
                request_envelope=b"",
                response_envelope=None,
                created_at=now,
                updated_at=now,
                parent_operation_id=operation_id,
            )
            operation = await self.journal.start(move, returning, activating)
        reach(operation, "after_prepare")
        return operation

    async def _complete(self, operation: Operation) -> Operation:
        """The remaining steps, from wherever the journal says the move stands."""
        if operation.state in (OperationState.PREPARED, OperationState.ANSWERED):
            # ANSWERED too: an older Administrator journaled the receipt before the
            # source installed it (the half is ANSWERED then, and installs it now).
            returned = await self._run(self.return_half, operation, RETURN_STEP)
            if returned.state is OperationState.REFUSED:
                assert returned.response_envelope is not None
                receipt = SignedEnvelope.FromString(returned.response_envelope)
                operation = await self.journal.refuse(
                    operation,
                    refusal_in(receipt, operation),
                    result=returned.result,
                    response_envelope=returned.response_envelope,
                )
            elif operation.state is OperationState.PREPARED:
                operation = await self.journal.answered(operation)
        if operation.state is OperationState.ANSWERED:
            activated = await self._run(self.activation_half, operation, ACTIVATE_STEP)
            operation = await self.journal.complete(operation, result=activated.result)
        return self.runner.outcome(self.return_half, operation)

    async def _run(self, half: Exchange, operation: Operation, step: str) -> Operation:
        """One half of the move, by the exchange runner, from where the journal says it
        stands; a failure is noted on the move too."""
        async with self.journal.noting_errors(operation):
            journaled = await self.journal.get(operation.operation_id + step)
            if journaled.state.finished:
                return journaled
            async with self.runner.reach_license_server(
                journaled, journaled.license_server
            ) as server:
                return await self.runner.advance(half, server, journaled)
