"""Vendor key rotation: a new key signs, every old one keeps verifying, everywhere the
keys are published (GetVendorKeys, ``vendor-keys.pub``), across restarts and replicas.

The Activation Server runs alone over real gRPC in process, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import pytest
from nacl.signing import SigningKey, VerifyKey

from services.activation_server.store.key_files import KeyDirectory
from tessera.activation.v1 import activation_pb2 as apb
from tessera.clock import from_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate
from tessera.envelope import open_envelope
from tessera.keys import InsecureKeyFile, read_vendor_public_keys, vendor_key_id
from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory
from tests.support.vendor import (
    STAFF,
    ActivationServerUnderTest,
    Host,
    restart_vendor,
    start_vendor,
    start_vendor_at,
)


async def vendor_keys(vendor: ActivationServerUnderTest) -> list[apb.VendorPublicKey]:
    return list((await vendor.activation.GetVendorKeys(apb.GetVendorKeysRequest())).keys)


async def signed_by(
    vendor: ActivationServerUnderTest, host: Host, line: apb.EntitlementLine
) -> str:
    """The key id that signs an activation answer and its certificate now."""
    reply = await vendor.activation.Activate(
        apb.ActivateRequest(request=host.activation(line.activation_id, 1))
    )
    answer = vendor.open(reply.response, apb.VendorActivationResponse)
    assert answer.certificate.key_id == reply.response.key_id
    return reply.response.key_id


async def test_a_rotated_key_signs_and_the_old_one_keeps_verifying(
    vendor: ActivationServerUnderTest, clock: FakeClock
) -> None:
    host = Host.new()
    line = await vendor.line(count=10)
    [first] = await vendor_keys(vendor)
    assert first.active
    assert vendor_key_id(VerifyKey(first.public_key)) == first.key_id
    reply = await vendor.activation.Activate(
        apb.ActivateRequest(request=host.activation(line.activation_id, 2))
    )
    old_answer = reply.response
    assert old_answer.key_id == first.key_id
    clock.advance(3600)

    rotated = await vendor.staff.RotateSigningKey(apb.RotateSigningKeyRequest(), metadata=STAFF)

    new = rotated.key
    assert new.active and new.key_id != first.key_id
    assert from_timestamp(new.created_at) == clock.now()
    keys = await vendor_keys(vendor)
    assert list(rotated.keys) == keys
    assert [(key.key_id, key.active) for key in keys] == [(first.key_id, False), (new.key_id, True)]
    assert keys[0].public_key == first.public_key
    # The published file lists both: what was signed before still verifies on a License
    # Server that reads it, and what is signed now does too.
    published = read_vendor_public_keys([vendor.published_keys_file])
    assert set(published) == {first.key_id, new.key_id}
    answer = open_envelope(old_answer, apb.VendorActivationResponse, published)
    old_certificate = open_envelope(answer.certificate, LicenseCertificate, published)
    assert await signed_by(vendor, host, line) == new.key_id
    receipt = await vendor.activation.Return(
        apb.ReturnRequest(request=host.return_request(old_certificate.certificate_id, 2, 0))
    )
    assert receipt.receipt.key_id == new.key_id
    assert vendor.open(receipt.receipt, apb.VendorReturnReceipt).credited == 2

    [entry] = await vendor.audit("key.rotated")
    assert (entry.subject, entry.actor) == (new.key_id, "vendor")
    assert json.loads(entry.detail_json)["previous_key_id"] == first.key_id
    key_file = vendor.data_dir / "vendor-keys" / f"{new.key_id}.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((vendor.data_dir / "vendor-signing.key").stat().st_mode) == 0o600


async def test_the_rotated_key_still_signs_after_a_restart(
    vendor: ActivationServerUnderTest,
) -> None:
    rotated = await vendor.staff.RotateSigningKey(apb.RotateSigningKeyRequest(), metadata=STAFF)
    before = await vendor_keys(vendor)
    vendor = await restart_vendor(vendor)
    try:
        assert await vendor_keys(vendor) == before
        assert await signed_by(vendor, Host.new(), await vendor.line()) == rotated.key.key_id
    finally:
        await vendor.close()


async def test_a_replica_sharing_the_key_files_follows_a_rotation(
    vendor: ActivationServerUnderTest, clock: FakeClock
) -> None:
    replica = await start_vendor_at(vendor.data_dir, vendor.database_url, clock)
    try:
        line = await vendor.line(count=5)
        rotated = await vendor.staff.RotateSigningKey(apb.RotateSigningKeyRequest(), metadata=STAFF)
        assert await signed_by(replica, Host.new(), line) == rotated.key.key_id
        assert await vendor_keys(replica) == await vendor_keys(vendor)
    finally:
        await replica.close()


async def test_the_signing_key_setting_names_the_first_key(
    tmp_path: Path, databases: DatabaseFactory, clock: FakeClock
) -> None:
    """A deployment from before rotation: a key file named by --signing-key and the old
    one-line published file. The key keeps signing; rotated keys and the record go beside
    it; the published file keeps every key it listed."""
    keys_dir = tmp_path / "secrets"
    keys_dir.mkdir()
    existing = SigningKey.generate()
    key_file = keys_dir / "vendor.key"
    key_file.write_text(existing.encode().hex() + "\n")
    key_file.chmod(0o600)
    retired = SigningKey.generate()
    existing_id = vendor_key_id(existing.verify_key)
    retired_id = vendor_key_id(retired.verify_key)
    (keys_dir / "vendor-keys.pub").write_text(
        f"{bytes(retired.verify_key).hex()}  # {retired_id}\n"
        f"{bytes(existing.verify_key).hex()}  # {existing_id}\n"
    )
    vendor = await start_vendor(tmp_path, databases, clock, "--signing-key", str(key_file))
    try:
        vendor.keys_dir = keys_dir
        assert [key.key_id for key in await vendor_keys(vendor)] == [existing_id]
        assert await signed_by(vendor, Host.new(), await vendor.line()) == existing_id
        rotated = await vendor.staff.RotateSigningKey(apb.RotateSigningKeyRequest(), metadata=STAFF)
        assert (keys_dir / "vendor-keys" / f"{rotated.key.key_id}.key").exists()
        assert json.loads((keys_dir / "vendor-keys" / "keyring.json").read_text())["active"] == (
            rotated.key.key_id
        )
        published = read_vendor_public_keys([keys_dir / "vendor-keys.pub"])
        assert set(published) == {existing_id, retired_id, rotated.key.key_id}
    finally:
        await vendor.close()


def test_a_rotated_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    files = KeyDirectory(tmp_path / "vendor-signing.key")
    files.load(dt.datetime.now(dt.UTC))
    keyring = files.add_active(SigningKey.generate(), dt.datetime.now(dt.UTC))
    (files.directory / f"{keyring.active_key_id}.key").chmod(0o644)
    with pytest.raises(InsecureKeyFile):
        files.load(dt.datetime.now(dt.UTC))
