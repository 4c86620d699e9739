"""What happens to a held license, told to the application as it happens.

A :class:`~clients.lease.Lease` reports these to its ``on_event`` callback and to every
``async for event in lease.events()`` loop. ``Lost`` and ``Released`` are the last event
of a lease; the others may repeat. An Enterprise Server raises its license alarm on
``Lost`` (and may warn on ``ExpiryWarning``)::

    async for event in lease.events():
        match event:
            case Lost(error=LeaseRevoked(reason=reason)):
                raise_alarm(f"{lease.feature} revoked: {reason}")
            case ExpiryWarning(remaining=remaining):
                warn(f"no License Server reachable; lease ends in {remaining}")
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from clients.errors import LicenseError, LicenseLost


@dataclass(frozen=True)
class Queued:
    """The acquire waits in the feature's queue; ``position`` 1 is next in line."""

    position: int


@dataclass(frozen=True)
class Interrupted:
    """The lease stream to ``server`` broke; the client is resuming the same lease (on
    that server or another of the address). The seats stay the client's until
    ``expires_at`` (the License Server's clock)."""

    server: str
    error: LicenseError | None
    expires_at: dt.datetime


@dataclass(frozen=True)
class Resumed:
    """The same lease was resumed on ``server`` (a new stream, a higher ``epoch``)."""

    server: str
    epoch: int
    expires_at: dt.datetime


@dataclass(frozen=True)
class ExpiryWarning:
    """No License Server could be reached for a while: the lease ends in ``remaining``
    unless a resume gets through first."""

    remaining: dt.timedelta
    expires_at: dt.datetime


@dataclass(frozen=True)
class Lost:
    """The license is gone (revoked, expired): ``error`` says why. The last event."""

    error: LicenseLost


@dataclass(frozen=True)
class Released:
    """The license was checked in (``checked_in`` False: no License Server could be
    reached, so the seats come back when the lease's TTL runs out). The last event."""

    checked_in: bool


LeaseEvent = Queued | Interrupted | Resumed | ExpiryWarning | Lost | Released
