"""Unit tests of the shared package: IDs, addresses, signed envelopes and key files."""

from __future__ import annotations

import errno
import gc
import multiprocessing
import os
import random
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest
from nacl.signing import SigningKey

from tessera.activation.v1.activation_pb2 import HostActivationRequest, VendorActivationResponse
from tessera.address import DEFAULT_PORTS, ServerAddress, parse_address
from tessera.common.v1.common_pb2 import LicenseCertificate, SignedEnvelope
from tessera.envelope import open_envelope, open_with_key, seal
from tessera.errors import (
    BadSignature,
    EnvelopeRejected,
    InvalidInput,
    InvalidLicenseServerAddress,
    UnknownSigningKey,
    WrongPayloadType,
)
from tessera.ids import (
    ACTIVATION_PREFIX,
    ALPHABET,
    ENTITLEMENT_PREFIX,
    check_character,
    new_id,
    parse_id,
)
from tessera.keys import (
    HostIdentity,
    InsecureKeyFile,
    UnreadableKeyFile,
    host_id,
    load_or_create_signing_key,
    machine_binding,
    read_vendor_public_keys,
    vendor_key_id,
)
from tessera.server.handlers import ServiceRegistrar
from tessera.server.serving import REFUSALS, YOUNG_COLLECTION_THRESHOLD, tune_garbage_collection

# IDs


def _seeded_ids(prefix: str, count: int, seed: int) -> list[str]:
    """IDs made exactly as new_id makes them, but reproducibly (new_id uses secrets)."""
    rng = random.Random(seed)
    ids = []
    for _ in range(count):
        body = "".join(rng.choice(ALPHABET) for _ in range(11))
        chars = body + check_character(body)
        ids.append(f"{prefix}-{chars[0:4]}-{chars[4:8]}-{chars[8:12]}")
    return ids


SAMPLE_IDS = _seeded_ids(ENTITLEMENT_PREFIX, 4, seed=1) + _seeded_ids(ACTIVATION_PREFIX, 4, seed=2)


def _chars(identifier: str) -> tuple[str, str]:
    prefix, _, rest = identifier.partition("-")
    return prefix, rest.replace("-", "")


def _formatted(prefix: str, chars: str) -> str:
    return f"{prefix}-{chars[0:4]}-{chars[4:8]}-{chars[8:12]}"


@pytest.mark.parametrize("prefix", [ENTITLEMENT_PREFIX, ACTIVATION_PREFIX])
def test_new_id_round_trips_through_parse_id(prefix: str) -> None:
    for _ in range(50):
        identifier = new_id(prefix)
        assert len(identifier) == len(prefix) + 15
        assert parse_id(prefix, identifier, "id") == identifier


def test_parse_id_normalises_case_spaces_dashes_and_confusables() -> None:
    # A body holding 0 and 1 so that O, I and L have something to stand for.
    body = "01A01B01C01"
    identifier = _formatted(ENTITLEMENT_PREFIX, body + check_character(body))
    _, chars = _chars(identifier)
    assert parse_id(ENTITLEMENT_PREFIX, identifier.lower(), "id") == identifier
    assert parse_id(ENTITLEMENT_PREFIX, f"  {identifier}  ", "id") == identifier
    assert parse_id(ENTITLEMENT_PREFIX, "ENT " + " ".join(chars), "id") == identifier
    assert parse_id(ENTITLEMENT_PREFIX, "ENT" + chars, "id") == identifier
    typed = "ent-" + chars.replace("0", "o").replace("1", "I", 2).replace("1", "l")
    assert parse_id(ENTITLEMENT_PREFIX, typed, "id") == identifier


@pytest.mark.parametrize("identifier", SAMPLE_IDS)
def test_every_single_character_substitution_is_rejected(identifier: str) -> None:
    prefix, chars = _chars(identifier)
    assert parse_id(prefix, identifier, "id") == identifier
    for position, original in enumerate(chars):
        for replacement in ALPHABET + "U":
            if replacement == original:
                continue
            typo = _formatted(prefix, chars[:position] + replacement + chars[position + 1 :])
            with pytest.raises(InvalidInput):
                parse_id(prefix, typo, "id")


@pytest.mark.parametrize("identifier", SAMPLE_IDS)
def test_every_adjacent_transposition_is_rejected(identifier: str) -> None:
    prefix, chars = _chars(identifier)
    for position in range(len(chars) - 1):
        a, b = chars[position], chars[position + 1]
        if a == b:
            continue  # swapping equal neighbours is no typo
        typo = _formatted(prefix, chars[:position] + b + a + chars[position + 2 :])
        with pytest.raises(InvalidInput):
            parse_id(prefix, typo, "id")


def test_transposition_of_neighbours_0_and_z_is_rejected() -> None:
    # Regression: the first check character (Luhn mod 32) let "0Z" <-> "Z0" slip through,
    # a blind spot in about 2% of random IDs; Damm's algorithm has none.
    body = "70ZK3M2QX2P"
    identifier = _formatted(ENTITLEMENT_PREFIX, body + check_character(body))
    _, chars = _chars(identifier)
    typo = _formatted(ENTITLEMENT_PREFIX, chars[0] + chars[2] + chars[1] + chars[3:])
    assert typo != identifier
    with pytest.raises(InvalidInput):
        parse_id(ENTITLEMENT_PREFIX, typo, "id")


def test_wrong_prefix_is_rejected() -> None:
    identifier = new_id(ENTITLEMENT_PREFIX)
    with pytest.raises(InvalidInput) as refused:
        parse_id(ACTIVATION_PREFIX, identifier, "activation_id")
    assert refused.value.field == "activation_id"
    _, chars = _chars(identifier)
    with pytest.raises(InvalidInput):
        parse_id(ENTITLEMENT_PREFIX, "XYZ-" + identifier[4:], "id")
    with pytest.raises(InvalidInput):
        parse_id(ENTITLEMENT_PREFIX, chars, "id")


@pytest.mark.parametrize("text", ["", "   ", None])
def test_missing_id_is_rejected(text: str | None) -> None:
    with pytest.raises(InvalidInput, match="is required"):
        parse_id(ENTITLEMENT_PREFIX, text, "entitlement_id")  # type: ignore[arg-type]


def test_wrong_length_is_rejected() -> None:
    identifier = new_id(ENTITLEMENT_PREFIX)
    prefix, chars = _chars(identifier)
    for wrong in (chars[:-1], chars[1:], chars + "0", chars + chars[-1], "", chars[:4]):
        with pytest.raises(InvalidInput):
            parse_id(prefix, f"{prefix}-{wrong}", "id")


def test_characters_outside_the_alphabet_are_rejected() -> None:
    identifier = new_id(ENTITLEMENT_PREFIX)
    for bad in ("U", "*", "#", "é"):
        with pytest.raises(InvalidInput):
            parse_id(ENTITLEMENT_PREFIX, identifier[:-1] + bad, "id")


# Addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("@localhost", [ServerAddress("localhost", DEFAULT_PORTS)]),
        ("27000@localhost", [ServerAddress("localhost", (27000,))]),
        (
            "19650@localhost;14650@192.0.2.2",
            [ServerAddress("localhost", (19650,)), ServerAddress("192.0.2.2", (14650,))],
        ),
        ("27000@[::1]", [ServerAddress("[::1]", (27000,))]),
        (
            "  27001@es-host.example.com ;  @es_2  ",
            [
                ServerAddress("es-host.example.com", (27001,)),
                ServerAddress("es_2", DEFAULT_PORTS),
            ],
        ),
        ("\t@localhost\n", [ServerAddress("localhost", DEFAULT_PORTS)]),
        ("1@h", [ServerAddress("h", (1,))]),
        ("65535@h", [ServerAddress("h", (65535,))]),
    ],
)
def test_valid_addresses(text: str, expected: list[ServerAddress]) -> None:
    assert parse_address(text) == expected


def test_default_ports_are_27000_to_27009() -> None:
    [server] = parse_address("@localhost")
    assert server.ports == tuple(range(27000, 27010))
    assert server.targets()[0] == "localhost:27000"
    assert server.targets()[-1] == "localhost:27009"
    assert str(server) == "@localhost"
    assert str(parse_address("27000@[::1]")[0]) == "27000@[::1]"
    assert parse_address("27000@[::1]")[0].targets() == ["[::1]:27000"]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "  ",
        "localhost",
        "@",
        "abc@host",
        "0@host",
        "70000@host",
        "65536@host",
        "-1@host",
        "+27000@host",
        "@bad host",
        ";",
        " ; ; ",
        "27000@",
        "27000@localhost;garbage",
        "27000@[::1",
        "@-host",
        "²@host",  # str.isdigit() accepts it, int() does not
    ],
)
def test_invalid_addresses(text: str) -> None:
    with pytest.raises(InvalidLicenseServerAddress) as refused:
        parse_address(text)
    assert str(refused.value).startswith("Invalid license server configuration")
    assert refused.value.reason == "INVALID_LICENSE_SERVER_ADDRESS"


# Envelopes


@pytest.fixture
def vendor_signing_key() -> tuple[str, SigningKey]:
    key = SigningKey.generate()
    return vendor_key_id(key.verify_key), key


def _certificate() -> LicenseCertificate:
    return LicenseCertificate(
        certificate_id="c-1",
        activation_id=new_id(ACTIVATION_PREFIX),
        feature="client.station",
        count=5,
        host_id="HOST",
        request_id="r-1",
        customer_organization="Test Building Owner",
    )


def test_envelope_round_trip(vendor_signing_key: tuple[str, SigningKey]) -> None:
    key_id, key = vendor_signing_key
    document = _certificate()
    envelope = seal(document, key_id, key)
    assert envelope.payload_type == "tessera.common.v1.LicenseCertificate"
    assert envelope.key_id == key_id
    assert open_envelope(envelope, LicenseCertificate, {key_id: key.verify_key}) == document
    assert open_with_key(envelope, LicenseCertificate, key.verify_key) == document
    # It survives travel as bytes (e.g. a file).
    carried = SignedEnvelope.FromString(envelope.SerializeToString())
    assert open_envelope(carried, LicenseCertificate, {key_id: key.verify_key}) == document


def test_envelope_with_one_flipped_byte_anywhere_is_rejected(
    vendor_signing_key: tuple[str, SigningKey],
) -> None:
    key_id, key = vendor_signing_key
    envelope = seal(_certificate(), key_id, key)
    trusted = {key_id: key.verify_key}
    for field in ("payload", "signature"):
        original: bytes = getattr(envelope, field)
        for index in range(len(original)):
            for flip in (0x01, 0x80):
                altered = bytearray(original)
                altered[index] ^= flip
                tampered = SignedEnvelope()
                tampered.CopyFrom(envelope)
                setattr(tampered, field, bytes(altered))
                with pytest.raises(BadSignature):
                    open_envelope(tampered, LicenseCertificate, trusted)


def test_truncated_or_missing_signature_is_rejected(
    vendor_signing_key: tuple[str, SigningKey],
) -> None:
    key_id, key = vendor_signing_key
    envelope = seal(_certificate(), key_id, key)
    trusted = {key_id: key.verify_key}
    for signature in (b"", envelope.signature[:-1], envelope.signature + b"\0"):
        tampered = SignedEnvelope()
        tampered.CopyFrom(envelope)
        tampered.signature = signature
        with pytest.raises(BadSignature):
            open_envelope(tampered, LicenseCertificate, trusted)


def test_envelope_signed_by_an_unknown_key_is_rejected(
    vendor_signing_key: tuple[str, SigningKey],
) -> None:
    key_id, key = vendor_signing_key
    stranger = SigningKey.generate()
    envelope = seal(_certificate(), vendor_key_id(stranger.verify_key), stranger)
    with pytest.raises(UnknownSigningKey):
        open_envelope(envelope, LicenseCertificate, {key_id: key.verify_key})
    with pytest.raises(UnknownSigningKey):
        open_envelope(envelope, LicenseCertificate, {})


def test_envelope_claiming_a_trusted_key_id_but_signed_by_another_is_rejected(
    vendor_signing_key: tuple[str, SigningKey],
) -> None:
    key_id, key = vendor_signing_key
    forged = seal(_certificate(), key_id, SigningKey.generate())
    with pytest.raises(BadSignature):
        open_envelope(forged, LicenseCertificate, {key_id: key.verify_key})


def test_envelope_of_another_type_is_rejected(vendor_signing_key: tuple[str, SigningKey]) -> None:
    key_id, key = vendor_signing_key
    envelope = seal(_certificate(), key_id, key)
    with pytest.raises(WrongPayloadType):
        open_envelope(envelope, VendorActivationResponse, {key_id: key.verify_key})
    with pytest.raises(WrongPayloadType):
        open_with_key(envelope, HostActivationRequest, key.verify_key)


@pytest.mark.parametrize("target", [VendorActivationResponse, HostActivationRequest])
def test_payload_type_relabelled_with_the_same_signature_is_rejected(
    vendor_signing_key: tuple[str, SigningKey], target: type[VendorActivationResponse]
) -> None:
    key_id, key = vendor_signing_key
    envelope = seal(_certificate(), key_id, key)
    relabelled = SignedEnvelope()
    relabelled.CopyFrom(envelope)
    relabelled.payload_type = target.DESCRIPTOR.full_name
    with pytest.raises(EnvelopeRejected):
        open_envelope(relabelled, target, {key_id: key.verify_key})
    with pytest.raises(BadSignature):
        open_with_key(relabelled, target, key.verify_key)


def test_empty_envelope_is_rejected(vendor_signing_key: tuple[str, SigningKey]) -> None:
    key_id, key = vendor_signing_key
    with pytest.raises(WrongPayloadType):
        open_envelope(SignedEnvelope(), LicenseCertificate, {key_id: key.verify_key})


# Keys


def test_new_key_file_has_mode_0600_and_reloads_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "host.key"
    created = load_or_create_signing_key(path)
    assert created.created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_signing_key(path)
    assert not again.created
    assert bytes(again.signing_key) == bytes(created.signing_key)
    assert again.signing_key.verify_key == created.signing_key.verify_key


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "host.key"
    load_or_create_signing_key(path)
    path.chmod(mode)
    with pytest.raises(InsecureKeyFile, match="0600"):
        load_or_create_signing_key(path)


def _create_key_when_told(path: Path, go: Any, results: Any) -> None:
    go.wait()
    key_file = load_or_create_signing_key(path)
    results.put((bytes(key_file.signing_key.verify_key), key_file.created))


def test_processes_creating_one_key_file_together_agree_on_one_key(tmp_path: Path) -> None:
    """Replicas sharing a data directory start together: each either creates the key or
    loads the one another created, whole (never a half-written file), and all agree."""
    context = multiprocessing.get_context("spawn")
    for attempt in range(3):
        path = tmp_path / f"attempt-{attempt}" / "host.key"
        go, results = context.Event(), context.Queue()
        racers = [
            context.Process(target=_create_key_when_told, args=(path, go, results))
            for _ in range(6)
        ]
        for racer in racers:
            racer.start()
        go.set()
        for racer in racers:
            racer.join(timeout=60)
            assert racer.exitcode == 0  # a racer that read a half-written key crashed
        outcomes = [results.get(timeout=5) for _ in racers]
        assert len({public_key for public_key, _ in outcomes}) == 1
        assert sum(created for _, created in outcomes) == 1
        assert os.listdir(path.parent) == ["host.key"]  # no drafts left behind


def test_a_key_that_fails_to_reach_the_disk_leaves_no_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails (a full disk; a crash is the same as far as the file goes)
    leaves nothing at the key's path, so the next start makes a key instead of finding
    a half-written one."""
    path = tmp_path / "host.key"

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        load_or_create_signing_key(path)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    assert load_or_create_signing_key(path).created


def test_a_filesystem_without_hard_links_still_gets_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where os.link is refused (SMB, FAT), the key is written in place instead."""

    def no_hard_links(source: object, target: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    path = tmp_path / "host.key"
    monkeypatch.setattr(os, "link", no_hard_links)
    created = load_or_create_signing_key(path)
    assert created.created
    assert os.listdir(tmp_path) == ["host.key"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_signing_key(path).signing_key == created.signing_key


@pytest.mark.parametrize("content", ["", "not hex\n", "abcd\n"])
def test_a_key_file_without_a_key_is_refused_with_the_way_out(tmp_path: Path, content: str) -> None:
    """An empty or damaged key file (an older version could leave an empty one after a
    crash) stops the service with a reason (REFUSALS), not a traceback."""
    path = tmp_path / "host.key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(UnreadableKeyFile, match="does not hold an Ed25519 key"):
        load_or_create_signing_key(path)
    assert UnreadableKeyFile in REFUSALS


def test_host_id_depends_on_key_and_machine_binding() -> None:
    key = SigningKey.generate()
    here = HostIdentity(key, machine_binding("machine-a"))
    same = HostIdentity(SigningKey(bytes(key)), machine_binding("machine-a"))
    moved = HostIdentity(key, machine_binding("machine-b"))
    other_key = HostIdentity(SigningKey.generate(), machine_binding("machine-a"))
    assert here.host_id == same.host_id
    assert here.host_id != moved.host_id
    assert here.host_id != other_key.host_id
    assert here.host_id == host_id(bytes(key.verify_key), machine_binding("machine-a"))
    assert machine_binding("machine-a") != machine_binding("machine-b")
    assert b"machine-a" not in machine_binding("machine-a")


def test_read_vendor_public_keys_skips_missing_files_and_comments(tmp_path: Path) -> None:
    first, second, third = (SigningKey.generate().verify_key for _ in range(3))
    keys = tmp_path / "vendor-keys.pub"
    keys.write_text(
        "# vendor keys\n"
        "\n"
        f"{bytes(first).hex()}  # {vendor_key_id(first)}\n"
        f"   {bytes(second).hex()}\n"
        f"# {bytes(third).hex()}\n"
    )
    trusted = read_vendor_public_keys([tmp_path / "missing.pub", keys, tmp_path / "gone.pub"])
    assert trusted == {vendor_key_id(first): first, vendor_key_id(second): second}
    assert read_vendor_public_keys([tmp_path / "missing.pub"]) == {}


def test_garbage_collection_is_tuned_once_a_service_is_built() -> None:
    before = gc.get_threshold()
    try:
        tune_garbage_collection()
        assert gc.get_freeze_count() > 0  # start-up's objects are out of the collector's sight
        assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, *before[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


async def test_a_service_registered_only_as_a_generic_handler_is_refused() -> None:
    """Served unwrapped it would skip access control, so the registrar refuses it."""

    def add_generically(servicer: object, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("tessera.test.v1.Old", {}),)
        )

    registrar = ServiceRegistrar(grpc.aio.server(), [])
    refused = r"tessera\.test\.v1\.Old registered only a generic handler"
    with pytest.raises(TypeError, match=refused):
        registrar.add_servicer(add_generically, object())
