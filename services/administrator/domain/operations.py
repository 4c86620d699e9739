"""The Administrator's use cases, wired together over one journal and one vendor.

Each flow has its own module: activation, returns, repair, move, offline (files), and
overview (look-ups); exchange holds the pattern they share (prepare -> vendor ->
install, journaled step by step), journal the journal's rules, resume the pass over
unfinished operations at start.
"""

from __future__ import annotations

from services.administrator.domain.activation import ActivationExchange, Activations
from services.administrator.domain.check_in import CheckIns
from services.administrator.domain.exchange import ExchangeRunner
from services.administrator.domain.journal import OperationJournal
from services.administrator.domain.metrics import OperationMetrics
from services.administrator.domain.model import OperationKind
from services.administrator.domain.move import Moves
from services.administrator.domain.offline import Offline
from services.administrator.domain.overview import Overview
from services.administrator.domain.registration import Registrations
from services.administrator.domain.repair import RepairExchange, Repairs
from services.administrator.domain.resume import ResumeReport, resume_unfinished
from services.administrator.domain.returns import ReturnExchange, Returns
from services.administrator.peers import ActivationServerClient, LicenseServers
from services.administrator.store.repository import Journal
from tessera.clock import Clock


class Operations:
    """Brokers activation, return, repair and move between License Servers and the vendor."""

    def __init__(
        self,
        store: Journal,
        activation_server: ActivationServerClient,
        clock: Clock,
        metrics: OperationMetrics | None = None,
        license_servers: LicenseServers | None = None,
    ) -> None:
        license_servers = license_servers or LicenseServers()
        self.journal = OperationJournal(store, clock, metrics)
        self.registrations = Registrations(store, clock)
        runner = ExchangeRunner(self.journal, self.registrations, clock, license_servers)
        activation = ActivationExchange(activation_server)
        return_ = ReturnExchange(activation_server)
        repair = RepairExchange(activation_server)
        self.overview = Overview(activation_server, license_servers)
        self.check_ins = CheckIns(store, activation_server, license_servers)
        self.activations = Activations(self.journal, runner, activation, clock)
        self.returns = Returns(runner, return_)
        self.repairs = Repairs(runner, repair)
        self.moves = Moves(self.journal, runner, return_, activation, self.registrations, clock)
        self.offline = Offline(
            self.journal,
            runner,
            {
                OperationKind.ACTIVATE: activation,
                OperationKind.RETURN: return_,
                OperationKind.REPAIR: repair,
            },
            self.registrations,
        )

    async def resume_unfinished(self) -> ResumeReport:
        """Take every unfinished online operation on from where it stopped."""
        return await resume_unfinished(
            self.journal,
            {
                OperationKind.ACTIVATE: self.activations.resume,
                OperationKind.ACTIVATE_LOCAL: self.activations.resume_local,
                OperationKind.RETURN: self.returns.resume,
                OperationKind.REPAIR: self.repairs.resume,
                OperationKind.MOVE: self.moves.resume,
            },
        )
