"""What the Administrator shows Prometheus: how its journaled operations end.

An operation is counted once, when the journal moves it to COMPLETED or REFUSED (a retry
of a finished operation only reads the journal). A step that fails and leaves the
operation unfinished (a peer down, a vendor error on a return) is counted apart, each
time, with the reason the journal notes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from services.administrator.domain.model import OperationKind, OperationState


class OperationMetrics:
    """Finished operations by kind, result and reason; failed steps by kind and reason."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.finished = Counter(
            "tessera_admin_operations_total",
            "Operations finished, by kind (activate, return, repair, move, …), result "
            "(completed, refused) and refusal reason",
            ["kind", "result", "reason"],
            registry=registry,
        )
        self.failed_steps = Counter(
            "tessera_admin_operation_errors_total",
            "Steps that failed and left an operation unfinished, by kind and reason",
            ["kind", "reason"],
            registry=registry,
        )

    def operation_finished(self, kind: OperationKind, state: OperationState, reason: str) -> None:
        self.finished.labels(kind.value, state.value, reason).inc()

    def step_failed(self, kind: OperationKind, reason: str) -> None:
        self.failed_steps.labels(kind.value, reason).inc()
