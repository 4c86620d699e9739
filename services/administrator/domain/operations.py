"""The Administrator's use cases, as the servicer calls them.

Each flow has its own module: activations, returns, repairs, moves, check_ins, offline
(files) and overview (look-ups); exchange holds the pattern they share (prepare -> vendor ->
install, journaled step by step), journal the journal's rules, resume the pass over
unfinished operations at start. ``server.py`` builds them over the ports (journal,
vendor, License Servers) and hands them over here.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.administrator.domain.activations import Activations
from services.administrator.domain.check_ins import CheckIns
from services.administrator.domain.journal import OperationJournal
from services.administrator.domain.model import OperationKind
from services.administrator.domain.moves import Moves
from services.administrator.domain.offline import Offline
from services.administrator.domain.overview import Overview
from services.administrator.domain.registration import Registrations
from services.administrator.domain.repairs import Repairs
from services.administrator.domain.resume import ResumeReport, resume_unfinished
from services.administrator.domain.returns import Returns


@dataclass(frozen=True)
class Operations:
    """Brokers activation, return, repair and move between License Servers and the vendor."""

    journal: OperationJournal
    registrations: Registrations
    overview: Overview
    check_ins: CheckIns
    activations: Activations
    returns: Returns
    repairs: Repairs
    moves: Moves
    offline: Offline

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
