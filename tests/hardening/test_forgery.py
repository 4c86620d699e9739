"""Forgery and replay against a running site (real processes, real gRPC on loopback).

- A stolen lease id without its secret: Heartbeat, Checkin and a stream resume are refused
  and the lease is untouched.
- A lease secret replayed from another client: the secret is the proof of holding the
  lease (the protocol's client host is the client's own claim, and a resume after a
  network blip may come from a new address), so the resume is honoured, but it fences the
  first holder out and never counts a second seat.
- An Administrator response file whose signed answer was altered (its checksum recomputed)
  is refused and changes nothing in any database; the genuine file then completes.
- An old Administrator response file imported twice changes nothing the second time; an
  activation response file imported again after its certificate was returned changes
  nothing (the Administrator answers with the operation's record), and sent straight to
  the License Server it is refused: the returned seats stay returned.

The vendor-side forgeries (tampered, re-signed and re-addressed envelopes) are in
tests/activation_server/test_bad_input.py, tests/license_server/test_bad_input.py,
tests/activation_server/test_returns.py and tests/license_server/test_trusted_storage.py.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from services.administrator.domain.offline_files import RESPONSE, armour, read_response_file
from tessera.admin.v1 import admin_pb2 as pb
from tessera.license.v1 import license_pb2 as lpb
from tests.support.real_site import RealSite, reason_of, started_site, state_of

pytestmark = pytest.mark.e2e

TIMEOUT = 20.0


@pytest.fixture(scope="module")
def real_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealSite]:
    """One site for the module; each test licenses a feature of its own."""
    yield from started_site(tmp_path_factory.mktemp("forgery"))


# Catalog features, one per test, so the tests on the shared site never meet.
FEATURES = iter(
    ["client.graphiceditor", "client.script", "client.functionblock.view",
     "server.enterprise.central", "server.ec.es", "server.device.es", "server.device.as"]
)  # fmt: skip


@pytest.fixture
def feature() -> str:
    return next(FEATURES)


class Stream:
    """One client's Lease stream, driven message by message."""

    def __init__(self, real_site: RealSite) -> None:
        self._outbox: queue.Queue[lpb.LeaseRequest | None] = queue.Queue()
        self._responses: Any = real_site.leases.Lease(self._requests(), timeout=TIMEOUT)

    def _requests(self) -> Iterator[lpb.LeaseRequest]:
        while (request := self._outbox.get()) is not None:
            yield request

    def push(self, **kind: Any) -> None:
        """Send a message without waiting for an answer."""
        self._outbox.put(lpb.LeaseRequest(**kind))

    def send(self, **kind: Any) -> lpb.LeaseResponse:
        self.push(**kind)
        response: lpb.LeaseResponse = next(self._responses)
        return response

    def next(self) -> lpb.LeaseResponse:
        response: lpb.LeaseResponse = next(self._responses)
        return response

    def close(self) -> None:
        """Half-close (ending the request thread) and cancel the call."""
        self._outbox.put(None)
        self._responses.cancel()

    def error(self) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            while True:
                next(self._responses)
        return caught.value


def checkout(real_site: RealSite, feature: str, host: str = "ws-1") -> lpb.LeaseGranted:
    return real_site.leases.Checkout(
        lpb.CheckoutRequest(acquire=lpb.LeaseAcquire(feature=feature, count=1, client_host=host)),
        timeout=TIMEOUT,
    ).granted


def leases_table(real_site: RealSite, feature: str) -> list[tuple[Any, ...]]:
    return [
        row
        for row in state_of(real_site["license"].database)["leases"]
        if ("feature", feature) in row
    ]


def used(real_site: RealSite, feature: str) -> int:
    reply = real_site.leases.GetLicenseInformation(
        lpb.GetLicenseInformationRequest(feature=feature), timeout=TIMEOUT
    )
    return sum(f.used for f in reply.features)


def held(real_site: RealSite, feature: str) -> list[lpb.LeaseEntry]:
    reply = real_site.lease_admin.ListLeases(
        lpb.ListLeasesRequest(feature=feature),
        metadata=real_site["license"].credentials(),
        timeout=TIMEOUT,
    )
    return [entry for entry in reply.leases if entry.state == lpb.LEASE_STATE_HELD]


def refused(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=TIMEOUT, **kwargs)
    return caught.value


def code_of(error: grpc.RpcError) -> grpc.StatusCode:
    assert isinstance(error, grpc.Call)
    code: grpc.StatusCode = error.code()
    return code


# ---------------------------------------------------------------------------------------
# Leases
# ---------------------------------------------------------------------------------------


def test_a_stolen_lease_id_without_its_secret_gets_nothing(
    real_site: RealSite, feature: str
) -> None:
    real_site.activate(feature, 2)
    victim = checkout(real_site, feature)
    other = checkout(real_site, feature, "ws-2")
    before = leases_table(real_site, feature)
    guesses = ["", "x", victim.lease_secret[:-1], victim.lease_secret.upper(), other.lease_secret]
    for secret in guesses:
        for call in (real_site.leases.Heartbeat, real_site.leases.Checkin):
            request_type = (
                lpb.HeartbeatRequest if call is real_site.leases.Heartbeat else lpb.CheckinRequest
            )
            error = refused(call, request_type(lease_id=victim.lease_id, lease_secret=secret))
            assert code_of(error) in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        stream = Stream(real_site)
        stream.push(resume=lpb.LeaseResume(lease_id=victim.lease_id, lease_secret=secret))
        assert code_of(stream.error()) in (
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        stream.close()
    # Not a heartbeat, not an epoch, not a release: the rows are exactly as they were.
    assert leases_table(real_site, feature) == before
    assert used(real_site, feature) == 2
    # The rightful holder still holds it.
    real_site.leases.Heartbeat(
        lpb.HeartbeatRequest(lease_id=victim.lease_id, lease_secret=victim.lease_secret),
        timeout=TIMEOUT,
    )


def test_a_secret_replayed_from_another_client_fences_the_first_and_counts_one_seat(
    real_site: RealSite, feature: str
) -> None:
    real_site.activate(feature, 2)
    first = Stream(real_site)
    granted = first.send(
        acquire=lpb.LeaseAcquire(feature=feature, count=1, client_host="ws-owner")
    ).granted
    assert granted.lease_id and granted.epoch >= 0

    # Someone else, on another connection, presents the id and the secret.
    thief = Stream(real_site)
    resumed = thief.send(
        resume=lpb.LeaseResume(lease_id=granted.lease_id, lease_secret=granted.lease_secret)
    ).granted
    assert (resumed.lease_id, resumed.resumed) == (granted.lease_id, True)
    assert resumed.epoch > granted.epoch

    # The first stream is told at once, and may no longer act on the lease.
    revoked = first.next()
    assert revoked.revoked.reason == "LEASE_RESUMED_ELSEWHERE"
    # One lease, one seat, still shown as the owner's host: no second seat for a replay.
    entries = held(real_site, feature)
    assert [(e.lease_id, e.client_host, e.count) for e in entries] == [
        (granted.lease_id, "ws-owner", 1)
    ]
    assert used(real_site, feature) == 1
    # Checking in with the replayed secret ends the one lease; no seat is left behind.
    assert thief.send(release=lpb.LeaseRelease()).HasField("released")
    assert used(real_site, feature) == 0 and held(real_site, feature) == []
    first.close()
    thief.close()


def test_a_secret_is_bound_to_its_own_lease(real_site: RealSite, feature: str) -> None:
    real_site.activate(feature, 2)
    a, b = checkout(real_site, feature, "ws-a"), checkout(real_site, feature, "ws-b")
    before = leases_table(real_site, feature)
    stream = Stream(real_site)
    stream.push(resume=lpb.LeaseResume(lease_id=b.lease_id, lease_secret=a.lease_secret))
    assert code_of(stream.error()) == grpc.StatusCode.NOT_FOUND
    stream.close()
    error = refused(
        real_site.leases.Checkin,
        lpb.CheckinRequest(lease_id=b.lease_id, lease_secret=a.lease_secret),
    )
    assert code_of(error) == grpc.StatusCode.NOT_FOUND
    assert leases_table(real_site, feature) == before


# ---------------------------------------------------------------------------------------
# Administrator response files
# ---------------------------------------------------------------------------------------


def everything(real_site: RealSite) -> dict[str, Any]:
    return {name: state_of(service.database) for name, service in real_site.services.items()}


def offline_activation(
    real_site: RealSite, feature: str, seats: int, operation_id: str
) -> tuple[str, bytes]:
    """Activate ``seats`` through request and response files; (certificate id, answer)."""
    order = real_site.sell(feature, 5)
    installed_before = certificate_ids(real_site)
    exported = real_site.administrator.ExportRequest(
        pb.ExportRequestRequest(
            kind=pb.OPERATION_KIND_ACTIVATE,
            license_server=real_site.license_address,
            activation_id=order.lines[0].activation_id,
            count=seats,
            operation_id=operation_id,
        ),
        timeout=TIMEOUT,
    )
    answer = real_site.administrator.SubmitRequest(
        pb.SubmitRequestRequest(request_file=exported.request_file), timeout=TIMEOUT
    ).response_file
    imported = real_site.administrator.ImportResponse(
        pb.ImportResponseRequest(license_server=real_site.license_address, response_file=answer),
        timeout=TIMEOUT,
    )
    assert imported.operation.state == pb.OPERATION_STATE_COMPLETED
    (installed,) = certificate_ids(real_site) - installed_before
    return installed, answer


def certificate_ids(real_site: RealSite) -> set[str]:
    certificates = real_site.trusted_storage.ListCertificates(
        lpb.ListCertificatesRequest(), metadata=real_site["license"].credentials(), timeout=TIMEOUT
    )
    return {c.certificate.certificate_id for c in certificates.certificates}


def test_an_answer_file_imported_twice_changes_nothing_the_second_time(
    real_site: RealSite, feature: str
) -> None:
    _, answer = offline_activation(real_site, feature, 2, "air-twice")
    before = everything(real_site)
    again = real_site.administrator.ImportResponse(
        pb.ImportResponseRequest(license_server=real_site.license_address, response_file=answer),
        timeout=TIMEOUT,
    )
    assert again.operation.state == pb.OPERATION_STATE_COMPLETED
    assert everything(real_site) == before
    assert used(real_site, feature) == 0
    info = real_site.leases.GetLicenseInformation(
        lpb.GetLicenseInformationRequest(feature=feature), timeout=TIMEOUT
    )
    assert [(f.activated, f.available) for f in info.features] == [(2, 2)]


def test_an_old_answer_file_imported_after_a_return_changes_nothing(
    real_site: RealSite, feature: str
) -> None:
    certificate_id, answer = offline_activation(real_site, feature, 2, "air-old")
    returned = real_site.administrator.Return(
        pb.ReturnRequest(license_server=real_site.license_address, certificate_id=certificate_id),
        timeout=TIMEOUT,
    )
    assert returned.operation.state == pb.OPERATION_STATE_COMPLETED
    before = everything(real_site)

    try:
        reply = real_site.administrator.ImportResponse(
            pb.ImportResponseRequest(
                license_server=real_site.license_address, response_file=answer
            ),
            timeout=TIMEOUT,
        )
    except grpc.RpcError as error:
        print("the old answer file was refused:", code_of(error), error)
        assert code_of(error) in (
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.NOT_FOUND,
        ), error
    else:
        print("the old answer file was answered with its operation:", reply.operation.state)
        # Answering with the operation's record is allowed; re-installing is not.
        assert reply.operation.state == pb.OPERATION_STATE_COMPLETED
    assert everything(real_site) == before

    # Straight to the License Server, past the Administrator's journal: the request it
    # answers was consumed, so the old answer cannot install the returned seats again.
    envelope = read_response_file(answer).response
    replayed = refused(
        real_site.trusted_storage.InstallActivation,
        lpb.InstallActivationRequest(response=envelope),
        metadata=real_site["license"].credentials(),
    )
    assert code_of(replayed) == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(replayed) == "CERTIFICATE_RETURNED"
    assert everything(real_site) == before
    # The returned seats do not come back.
    info = real_site.leases.GetLicenseInformation(
        lpb.GetLicenseInformationRequest(), timeout=TIMEOUT
    )
    assert [f.activated for f in info.features if f.feature == feature and f.activated] == []
    assert certificate_id not in certificate_ids(real_site)


def test_a_forged_answer_file_changes_nothing_and_the_genuine_one_completes(
    real_site: RealSite, feature: str
) -> None:
    order = real_site.sell(feature, 5)
    exported = real_site.administrator.ExportRequest(
        pb.ExportRequestRequest(
            kind=pb.OPERATION_KIND_ACTIVATE,
            license_server=real_site.license_address,
            activation_id=order.lines[0].activation_id,
            count=2,
            operation_id="air-forged",
        ),
        timeout=TIMEOUT,
    )
    answer = real_site.administrator.SubmitRequest(
        pb.SubmitRequestRequest(request_file=exported.request_file), timeout=TIMEOUT
    ).response_file
    # One byte of the vendor's signature changed, and the file's checksum made to match.
    file = read_response_file(answer)
    file.response.signature = bytes([file.response.signature[0] ^ 1]) + file.response.signature[1:]
    forged = armour(RESPONSE, file.SerializeToString(), [("Operation", file.operation_id)])
    before = everything(real_site)

    for _ in range(2):
        error = refused(
            real_site.administrator.ImportResponse,
            pb.ImportResponseRequest(
                license_server=real_site.license_address, response_file=forged
            ),
        )
        assert (code_of(error), reason_of(error)) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "BAD_SIGNATURE",
        )
        # In no database of the site did anything change: not the journal, not trusted
        # storage, not the vendor's records.
        assert everything(real_site) == before

    imported = real_site.administrator.ImportResponse(
        pb.ImportResponseRequest(license_server=real_site.license_address, response_file=answer),
        timeout=TIMEOUT,
    )
    assert imported.operation.state == pb.OPERATION_STATE_COMPLETED
    info = real_site.leases.GetLicenseInformation(
        lpb.GetLicenseInformationRequest(feature=feature), timeout=TIMEOUT
    )
    assert [(f.activated, f.available) for f in info.features] == [(2, 2)]
