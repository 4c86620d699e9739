"""The Tessera client library: what Enterprise Servers, WorkStations and tools embed to
hold their licenses.

::

    from clients import LicenseClient, NoSeatAvailable

    async with LicenseClient("@localhost", display_name="WorkStation 6.0") as client:
        async with client.lease("client.station") as lease:
            ...  # heartbeats, resume and failover happen by themselves

``LicenseClient.license()`` applies EBO's start-up rule (a valid local license first, else
a network lease, else NoLicense); ``SyncLicenseClient`` is the same API for code without
an event loop; both take their settings as keyword arguments or as one ``ClientOptions``.
``ClientTls`` turns on TLS (and mutual TLS) for the connections.
docs/integrator.md is the guide.
"""

from clients.backoff import Backoff
from clients.client import FeatureInformation, LicenseClient
from clients.errors import (
    CountAboveActivated,
    FeatureNotLicensed,
    InvalidLicenseRequest,
    InvalidLicenseServerConfiguration,
    LeaseExpired,
    LeaseRevoked,
    LicenseError,
    LicenseLost,
    LicensePermissionDenied,
    LicenseRefused,
    LicenseServerBusy,
    LicenseServerUnreachable,
    LicenseWithdrawn,
    LocalLicenseExpired,
    NoLicense,
    NoSeatAvailable,
    QueueTimeout,
    TrustedStorageBroken,
)
from clients.events import (
    ExpiryWarning,
    Interrupted,
    LeaseEvent,
    Lost,
    Queued,
    Released,
    Resumed,
)
from clients.lease import Lease
from clients.license import License, LicenseState, LocalLicense
from clients.settings import ClientOptions
from clients.sync import SyncLicense, SyncLicenseClient
from tessera.tls import ClientTls

__all__ = [
    "Backoff",
    "ClientOptions",
    "ClientTls",
    "CountAboveActivated",
    "ExpiryWarning",
    "FeatureInformation",
    "FeatureNotLicensed",
    "Interrupted",
    "InvalidLicenseRequest",
    "InvalidLicenseServerConfiguration",
    "Lease",
    "LeaseEvent",
    "LeaseExpired",
    "LeaseRevoked",
    "License",
    "LicenseClient",
    "LicenseError",
    "LicenseLost",
    "LicensePermissionDenied",
    "LicenseRefused",
    "LicenseServerBusy",
    "LicenseServerUnreachable",
    "LicenseState",
    "LicenseWithdrawn",
    "LocalLicense",
    "LocalLicenseExpired",
    "Lost",
    "NoLicense",
    "NoSeatAvailable",
    "QueueTimeout",
    "Queued",
    "Released",
    "Resumed",
    "SyncLicense",
    "SyncLicenseClient",
    "TrustedStorageBroken",
]
