"""Fuzzing every RPC of every service with hostile messages and garbage bytes.

The RPC list comes from the service descriptors of the three contracts, so a new RPC is
fuzzed without touching this file. For each RPC, hypothesis builds requests of the right
protobuf shape with hostile values (empty, huge, unicode and control-character strings,
negative and huge integers, unknown enum values, absurd timestamps, nested messages,
unknown fields), sometimes mixed with real IDs of the site so calls get past the first
lookup; with the right bearer credential, with a wrong one and with none. Raw garbage bytes
go to every method as the request body, and the Lease stream gets sequences of hostile
messages.

Every call must end with a status other than INTERNAL and UNKNOWN (a clear refusal or a
success), a refused call must leave the three databases as they were, and every service
must still answer health afterwards.

Quick mode (CI) sends about a thousand messages. ``TESSERA_FUZZ_MESSAGES=100000`` sends
that many in total, spread over the RPCs, garbage bytes and streams.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.activation.v1 import activation_pb2
from tessera.admin.v1 import admin_pb2
from tessera.license.v1 import license_pb2
from tessera.license.v1 import license_pb2 as lpb
from tests.support.real_site import (
    RealSite,
    Volatile,
    changed_tables,
    error_info,
    started_site,
    state_of,
)

MESSAGES = int(os.environ.get("TESSERA_FUZZ_MESSAGES", "0") or 0)
# The long mode takes its time: about 100 messages a second on one core.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(max(120, MESSAGES // 10))]
QUICK_PER_RPC = 24
CALL_TIMEOUT = 20.0
Code = grpc.StatusCode
# A crash, an unmapped exception or a hang: never an acceptable answer to bad input.
FORBIDDEN = {Code.INTERNAL, Code.UNKNOWN, Code.DEADLINE_EXCEEDED}

# Which process serves which package.
PROCESS_OF = {"tessera.activation.v1": "activation", "tessera.license.v1": "license",
              "tessera.admin.v1": "admin"}  # fmt: skip
CONTRACTS = (activation_pb2, license_pb2, admin_pb2)


def all_methods() -> list[descriptor.MethodDescriptor]:
    """Every RPC of every service of the three contracts."""
    return [
        method
        for contract in CONTRACTS
        for service in contract.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def method_path(method: descriptor.MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def process_of(method: descriptor.MethodDescriptor) -> str:
    return PROCESS_OF[method.containing_service.file.package]


# ---------------------------------------------------------------------------------------
# Hostile values
# ---------------------------------------------------------------------------------------

HOSTILE_TEXT = [
    "", " ", "\x00", "a\x00b", "\n\r\t", "\x1b[31m", "\u202e", "\ufeff", "\U0001f600" * 40,
    "é" * 300, "\U0001d518\U0001d52b", "'; DROP TABLE leases; --", "%s%n", "../etc/passwd",
    "A" * 4096, "A" * 70_000, "27000@", "@", "@localhost;@localhost", "0@127.0.0.1",
    "99999999@127.0.0.1", "27000@[::1", "client.station", "CLIENT.STATION",
    "LEA-0000-0000-0000", "ENT-", "ACT-", "REQ-",
]  # fmt: skip
INT32 = [0, 1, -1, 2**31 - 1, -(2**31), 2**31 - 2, 86_400, -86_400]
INT64 = [*INT32, 2**63 - 1, -(2**63), 253_402_300_800, -62_135_596_801, 10**15]
UINT32 = [0, 1, 2**32 - 1, 2**31]
UINT64 = [0, 1, 2**64 - 1, 2**63]


def text(known: Sequence[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(HOSTILE_TEXT),
        st.sampled_from(list(known) or [""]),
        st.text(max_size=40),
        st.text(st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "Co"]), max_size=20),
        st.builds(lambda a, b: a + b, st.sampled_from(list(known) or [""]), st.text(max_size=3)),
    )


def binary(known: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=200),
        st.sampled_from([b"", b"\x00", b"\xff" * 64, b"\x00" * 100_000, *known]),
    )


def integers(low: int, high: int, specials: list[int]) -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([s for s in specials if low <= s <= high]),
        st.integers(low, high),
        st.integers(-10, 10).filter(lambda n: low <= n <= high),
    )


@dataclass(frozen=True)
class Known:
    """Real values of the running site, mixed into the hostile ones."""

    text: tuple[str, ...]
    binary: tuple[bytes, ...]


def scalar(field: FieldDescriptor, known: Known) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return text(known.text)
    if kind == FieldDescriptor.TYPE_BYTES:
        return binary(known.binary)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        values = [v.number for v in field.enum_type.values]
        # Proto3 enums are open: an unknown number arrives as itself.
        return st.one_of(st.sampled_from(values), integers(-(2**31), 2**31 - 1, [*INT32, 99]))
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64,
                FieldDescriptor.TYPE_SFIXED64):  # fmt: skip
        return integers(-(2**63), 2**63 - 1, INT64)
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return integers(0, 2**64 - 1, UINT64)
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return integers(0, 2**32 - 1, UINT32)
    return integers(-(2**31), 2**31 - 1, INT32)


def message(
    message_type: descriptor.Descriptor, known: Known, depth: int = 0
) -> st.SearchStrategy[Message]:
    """Messages of ``message_type`` whose fields are each absent or hostile."""
    cls = GetMessageClass(message_type)
    if depth > 3:
        return st.just(cls())
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in message_type.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key = scalar(field.message_type.fields_by_name["key"], known)
            value_field = field.message_type.fields_by_name["value"]
            value = (
                message(value_field.message_type, known, depth + 1)
                if value_field.message_type is not None
                else scalar(value_field, known)
            )
            fields[field.name] = st.dictionaries(key, value, max_size=3)
            continue
        one = (
            message(field.message_type, known, depth + 1)
            if field.message_type is not None
            else scalar(field, known)
        )
        if field.is_repeated:
            fields[field.name] = st.lists(one, max_size=3 if depth else 5)
        else:
            fields[field.name] = st.one_of(st.none(), one)

    def build(values: Mapping[str, Any]) -> Message:
        instance = cls()
        for name, value in values.items():
            if value is None:
                continue
            target: Any = getattr(instance, name)
            if isinstance(value, Message):
                target.CopyFrom(value)
            elif isinstance(value, dict):
                for key, item in value.items():
                    if isinstance(item, Message):
                        target[key].CopyFrom(item)
                    else:
                        target[key] = item
            elif isinstance(value, list):
                target.extend(value)
            else:
                setattr(instance, name, value)
        return instance

    return st.fixed_dictionaries(fields).map(build)


def unknown_field() -> st.SearchStrategy[bytes]:
    """A well-formed unknown length-delimited field, or nothing."""

    def encode(number: int, payload: bytes) -> bytes:
        return varint((number << 3) | 2) + varint(len(payload)) + payload

    return st.one_of(
        st.just(b""), st.builds(encode, st.integers(1000, 2**29 - 1), st.binary(max_size=64))
    )


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def request_bytes(message_type: descriptor.Descriptor, known: Known) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda body, extra: body.SerializeToString() + extra,
        message(message_type, known),
        unknown_field(),
    )


# Who the caller claims to be.
CREDENTIALS = ("right", "none", "wrong", "malformed")


def metadata_for(site: RealSite, process: str, credentials: str) -> tuple[tuple[str, str], ...]:
    if credentials == "right":
        return site[process].credentials()
    if credentials == "wrong":
        return (("authorization", "Bearer not-the-token"),)
    if credentials == "malformed":
        return (("authorization", "Basic dXNlcjpwYXNz"),)
    return ()


# ---------------------------------------------------------------------------------------
# The site and its state
# ---------------------------------------------------------------------------------------

# What may change on a refusal, by design: the vendor audits its refusals (a refusal is a
# vendor decision), and the License Server counts denials in its usage history. Lease
# expiry times move with heartbeats, which only accepted calls send.
VOLATILE = {
    "activation": Volatile(
        tables=frozenset({"audit_head"}),
        rows=lambda table, row: table == "audit_log" and str(row["action"]).endswith(".refused"),
    ),
    "license": Volatile(),
    "admin": Volatile(),
}


class DatabaseWatch:
    """One service's database state, read again only after a commit.

    SQLite's ``PRAGMA data_version`` on a connection of our own changes exactly when
    another connection commits, so most calls (refused before any write) cost one pragma
    instead of reading every table.
    """

    def __init__(self, path: Path, volatile: Volatile) -> None:
        self.path, self.volatile = path, volatile
        self._connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        self._version = -1
        self._state: dict[str, Any] = {}

    def state(self) -> dict[str, Any]:
        version = int(self._connection.execute("PRAGMA data_version").fetchone()[0])
        if version != self._version:
            self._state = state_of(self.path, self.volatile)
            self._version = version
        return self._state


PEER_REFUSAL_JOURNALS = {"admin.operations", "license.pending_requests"}


@dataclass
class Fuzzing:
    site: RealSite
    known: Known
    sent: int = 0
    refused: int = 0
    accepted: int = 0
    watches: dict[str, DatabaseWatch] = dataclasses.field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        if not self.watches:
            self.watches = {
                name: DatabaseWatch(service.database, VOLATILE[name])
                for name, service in self.site.services.items()
            }
        return {name: watch.state() for name, watch in self.watches.items()}

    def check_refusal_changed_nothing(
        self, before: dict[str, Any], what: str, error: grpc.RpcError
    ) -> dict[str, Any]:
        after = self.state()
        changes = {
            f"{name}.{table}"
            for name in before
            for table in changed_tables(before[name], after[name])
        }
        info = error_info(error)
        if info is not None and "peer" in info.metadata:
            # Refused by the vendor, passed on by the Administrator: the attempt stays
            # journaled on both sides so it can be resumed (see test_bad_input's
            # test_administrator_passes_vendor_refusals_through); nothing else may move.
            changes -= PEER_REFUSAL_JOURNALS
        assert not changes, f"{what} was refused ({error.code()}) but changed {changes}"
        return after

    def check_healthy(self) -> None:
        for name in self.site.services:
            assert self.site.healthy(name), f"{name} is not healthy: {self.site.log(name)}"


def unary(site: RealSite, process: str, path: str) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    return site.channel(process).unary_unary(path)  # no (de)serializers: raw bytes


def call_unary(fuzzing: Fuzzing, process: str, path: str, body: bytes, credentials: str) -> None:
    before = fuzzing.state()
    fuzzing.sent += 1
    try:
        unary(fuzzing.site, process, path)(
            body,
            metadata=metadata_for(fuzzing.site, process, credentials),
            timeout=CALL_TIMEOUT,
        )
    except grpc.RpcError as error:
        assert isinstance(error, grpc.Call)
        assert error.code() not in FORBIDDEN, (path, credentials, error.code(), error.details())
        fuzzing.refused += 1
        fuzzing.check_refusal_changed_nothing(before, f"{path} ({credentials})", error)
        return
    fuzzing.accepted += 1


def call_stream(fuzzing: Fuzzing, bodies: list[bytes]) -> None:
    path = "/tessera.license.v1.LeaseService/Lease"
    before = fuzzing.state()
    fuzzing.sent += len(bodies)
    stream: grpc.StreamStreamMultiCallable[bytes, bytes] = fuzzing.site.channel(
        "license"
    ).stream_stream(path)
    responses = stream(iter(bodies), timeout=CALL_TIMEOUT)
    granted = False
    try:
        for raw in responses:
            response = lpb.LeaseResponse.FromString(raw)
            granted = granted or response.HasField("granted")
    except grpc.RpcError as error:
        assert isinstance(error, grpc.Call)
        assert error.code() not in FORBIDDEN, (path, error.code(), error.details())
        fuzzing.refused += 1
        if not granted:
            fuzzing.check_refusal_changed_nothing(before, "a Lease stream", error)
        return
    fuzzing.accepted += 1


def known_values(site: RealSite) -> Known:
    """IDs and documents of the running site: a held lease, the activation, a request."""
    order = site.activate("client.station", 3)
    site.sell("server.enterprise.base", 2)
    held = site.leases.Checkout(
        lpb.CheckoutRequest(
            acquire=lpb.LeaseAcquire(feature="client.station", client_host="ws-1", count=1)
        )
    ).granted
    identity = site.trusted_storage.GetHostIdentity(
        license_pb2.GetHostIdentityRequest(), metadata=site["license"].credentials()
    )
    certificates = site.trusted_storage.ListCertificates(
        license_pb2.ListCertificatesRequest(), metadata=site["license"].credentials()
    )
    operations = site.administrator.ListOperations(admin_pb2.ListOperationsRequest())
    texts = [
        "client.station", "server.enterprise.base", "ws-1", held.lease_id,
        order.entitlement_id, order.lines[0].activation_id, identity.host_id,
        site.license_address, *(op.operation_id for op in operations.operations),
        *(c.certificate.certificate_id for c in certificates.certificates),
    ]  # fmt: skip
    blobs = [c.certificate.SerializeToString() for c in certificates.certificates]
    return Known(tuple(t for t in texts if t), tuple(blobs))


@pytest.fixture(scope="module")
def fuzzing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzing]:
    for site in started_site(tmp_path_factory.mktemp("fuzz")):
        yield Fuzzing(site, known_values(site))


# ---------------------------------------------------------------------------------------
# The suites
# ---------------------------------------------------------------------------------------

METHODS = all_methods()
UNARY = [m for m in METHODS if not m.client_streaming and not m.server_streaming]
STREAMING = [m for m in METHODS if m.client_streaming or m.server_streaming]
# The long mode's budget, shared out: each unary RPC, garbage bytes and the stream.
SHARES = len(UNARY) + 2


def examples(quick: int) -> int:
    return max(1, -(-MESSAGES // SHARES)) if MESSAGES else quick


def fuzz_settings(count: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=count,
        deadline=None,
        database=None,
        derandomize=not MESSAGES,  # CI reruns the same messages; long mode explores
        suppress_health_check=list(HealthCheck),
    )


def test_the_fuzzer_covers_every_rpc() -> None:
    """The RPC list is derived, not written down: all four services, Lease included."""
    services = {m.containing_service.full_name for m in METHODS}
    assert {
        "tessera.activation.v1.ActivationService", "tessera.activation.v1.VendorService",
        "tessera.license.v1.LeaseService", "tessera.license.v1.LeaseAdminService",
        "tessera.license.v1.TrustedStorageService", "tessera.admin.v1.AdministratorService",
    } <= services  # fmt: skip
    assert [m.name for m in STREAMING] == ["Lease"]
    assert len(UNARY) >= 40


@pytest.mark.parametrize("method", UNARY, ids=lambda m: f"{m.containing_service.name}.{m.name}")
def test_hostile_requests_get_a_clear_answer_and_change_nothing_when_refused(
    fuzzing: Fuzzing, method: descriptor.MethodDescriptor
) -> None:
    process, path = process_of(method), method_path(method)
    started = time.monotonic()

    @fuzz_settings(examples(QUICK_PER_RPC))
    @given(
        body=request_bytes(method.input_type, fuzzing.known),
        credentials=st.sampled_from(CREDENTIALS),
    )
    def one(body: bytes, credentials: str) -> None:
        call_unary(fuzzing, process, path, body, credentials)

    one()
    fuzzing.check_healthy()
    print(f"{path}: {fuzzing.sent} sent so far, {time.monotonic() - started:.1f} s")


def test_garbage_bytes_to_every_method_are_refused_cleanly(fuzzing: Fuzzing) -> None:
    paths = [(process_of(m), method_path(m)) for m in UNARY]

    @fuzz_settings(examples(3 * QUICK_PER_RPC))
    @given(
        target=st.sampled_from(paths),
        body=st.one_of(
            st.binary(min_size=1, max_size=300),
            st.sampled_from([b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 10]),
        ),
        credentials=st.sampled_from(CREDENTIALS),
    )
    def one(target: tuple[str, str], body: bytes, credentials: str) -> None:
        call_unary(fuzzing, *target, body, credentials)

    one()
    fuzzing.check_healthy()


def test_hostile_lease_streams_get_a_clear_answer(fuzzing: Fuzzing) -> None:
    hostile = request_bytes(lpb.LeaseRequest.DESCRIPTOR, fuzzing.known)
    garbage = st.binary(min_size=1, max_size=64)
    known = fuzzing.known
    plausible = st.builds(
        lambda feature, host, count, wait: (
            lpb.LeaseRequest(
                acquire=lpb.LeaseAcquire(feature=feature, client_host=host, count=count)
            ).SerializeToString()
            + (
                lpb.LeaseRequest(heartbeat=lpb.LeaseHeartbeat()).SerializeToString()
                if wait
                else b""
            )
        ),
        st.sampled_from(["client.station", "server.enterprise.base", *known.text[:3]]),
        text(known.text),
        integers(-(2**31), 2**31 - 1, INT32),
        st.booleans(),
    )

    # A stream counts its messages (two to three on average); the budget is shared as
    # for one unary RPC.
    @fuzz_settings(max(1, examples(3 * QUICK_PER_RPC) // 2))
    @given(st.lists(st.one_of(hostile, hostile, plausible, garbage), min_size=1, max_size=5))
    def one(bodies: list[bytes]) -> None:
        call_stream(fuzzing, bodies)

    one()
    fuzzing.check_healthy()


def test_after_the_fuzzing_the_site_still_works(fuzzing: Fuzzing) -> None:
    """Runs last: every process alive and healthy, and the License Server still leases."""
    fuzzing.check_healthy()
    information = fuzzing.site.leases.GetLicenseInformation(
        lpb.GetLicenseInformationRequest(feature="client.station"), timeout=10
    )
    assert information.features
    assert fuzzing.sent >= MESSAGES, "the long mode sent fewer messages than asked for"
    print(
        f"fuzzing: {fuzzing.sent} messages, {fuzzing.refused} refused, {fuzzing.accepted} accepted"
    )
