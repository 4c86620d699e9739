"""What the Activation Server shows Prometheus: the outcome of every vendor decision.

Each counter goes up once per answer, after its transaction commits: ``result`` says
what was decided and ``reason`` why a request was refused (the error's or the signed
receipt's reason; empty when granted). A retry of the same request id is answered again
and counted again.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

GRANTED = "granted"
REFUSED = "refused"
CREDITED = "credited"


class VendorMetrics:
    """Activation, return, repair and check-in outcomes; forced returns."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        labels = ["result", "reason"]
        self.activations = Counter(
            "tessera_activations_total",
            "Activation requests answered, by result (granted, refused) and refusal reason",
            labels,
            registry=registry,
        )
        self.returns = Counter(
            "tessera_returns_total",
            "Return requests answered, by result (credited, refused) and refusal reason",
            labels,
            registry=registry,
        )
        self.repairs = Counter(
            "tessera_repairs_total",
            "Repair requests answered, by result (granted, refused) and refusal reason",
            labels,
            registry=registry,
        )
        self.check_ins = Counter(
            "tessera_check_ins_total",
            "Check-ins of License Servers answered, by the host's standing (current, "
            "superseded: a superseded generation still checking in)",
            ["standing"],
            registry=registry,
        )
        self.forced_returns = Counter(
            "tessera_forced_returns_total",
            "Certificates credited back by vendor staff without their host",
            registry=registry,
        )

    def activation(self, refusal_reason: str = "") -> None:
        self.activations.labels(REFUSED if refusal_reason else GRANTED, refusal_reason).inc()

    def return_(self, refusal_reason: str = "") -> None:
        self.returns.labels(REFUSED if refusal_reason else CREDITED, refusal_reason).inc()

    def repair(self, refusal_reason: str = "") -> None:
        self.repairs.labels(REFUSED if refusal_reason else GRANTED, refusal_reason).inc()

    def check_in(self, standing: str) -> None:
        self.check_ins.labels(standing).inc()

    def forced_return(self) -> None:
        self.forced_returns.inc()
