"""Check-in at interpreter exit for leases whose event loop is gone.

A lease normally checks in from its ``async with`` exit, its ``release()``, or, when the
event loop shuts down (``asyncio.run`` cancels every task), from its own keeper task. A
lease whose loop was simply abandoned (stopped or closed with the keeper still pending)
can do none of these; at interpreter exit an ``atexit`` hook checks such leases in with a
plain synchronous gRPC call, each target tried for at most ``EXIT_TIMEOUT`` seconds.

Nothing can run on SIGKILL, ``os._exit`` or a power cut, and Python's default SIGTERM
handling exits without ``atexit`` hooks: there the seats come back when the lease's TTL
runs out, at the latest.
"""

from __future__ import annotations

import atexit
import logging
import threading
from dataclasses import dataclass, field

import grpc

from tessera.license.v1 import license_pb2 as pb
from tessera.license.v1 import license_pb2_grpc as pb_grpc
from tessera.tls import ClientTls, open_sync_channel

log = logging.getLogger(__name__)

EXIT_TIMEOUT = 2.0


@dataclass
class HeldLease:
    """What is needed to check a lease in without its loop: plain strings only."""

    lease_id: str
    secret: str
    targets: list[str] = field(default_factory=list)
    # The site token's call metadata, when the License Server requires one.
    metadata: tuple[tuple[str, str], ...] = ()
    # How the lease's License Servers are dialled (None: plaintext).
    tls: ClientTls | None = None


_held: dict[str, HeldLease] = {}
_lock = threading.Lock()


def hold(lease: HeldLease) -> None:
    """Remember ``lease`` until ``forget`` (its ``targets`` may be updated in place)."""
    with _lock:
        _held[lease.lease_id] = lease


def forget(lease_id: str) -> None:
    with _lock:
        _held.pop(lease_id, None)


def still_held() -> list[HeldLease]:
    with _lock:
        return list(_held.values())


def check_in_everything() -> None:
    """Check in every lease still held (the atexit hook)."""
    for lease in still_held():
        if check_in_now(lease):
            forget(lease.lease_id)
        else:
            log.warning(
                "could not check lease %s in at exit; its seats return when its TTL runs out",
                lease.lease_id,
            )


def check_in_now(lease: HeldLease, timeout: float = EXIT_TIMEOUT) -> bool:
    """Synchronous Checkin on the lease's targets in order; True once one answers."""
    request = pb.CheckinRequest(lease_id=lease.lease_id, lease_secret=lease.secret)
    for target in lease.targets:
        try:
            channel = open_sync_channel(target, lease.tls)
        except (OSError, ValueError) as error:  # e.g. a TLS file gone since start
            log.warning("cannot dial %s to check lease %s in: %s", target, lease.lease_id, error)
            continue
        with channel:
            try:
                pb_grpc.LeaseServiceStub(channel).Checkin(
                    request, timeout=timeout, metadata=lease.metadata
                )
            except grpc.RpcError as error:
                if isinstance(error, grpc.Call) and error.code() is grpc.StatusCode.NOT_FOUND:
                    continue  # not this License Server's lease
                if (
                    isinstance(error, grpc.Call)
                    and error.code() is grpc.StatusCode.FAILED_PRECONDITION
                ):
                    return True  # gone already (expired, resumed elsewhere)
                continue
            return True
    return False


# Registered at import, so it runs after the hooks registered later (atexit runs them in
# reverse): a SyncLicenseClient's own close comes first and checks in over its stream.
atexit.register(check_in_everything)
