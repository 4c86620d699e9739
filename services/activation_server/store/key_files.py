"""Vendor keys on disk: private keys as 0600 files, a record of which signs, the public
keys published for License Servers.

Beside the first key (``--signing-key``, default ``vendor-signing.key`` in the data
directory) lie:

- ``vendor-keys/<key id>.key``: each key made by a rotation (mode 0600, hex seed);
- ``vendor-keys/keyring.json``: every key id with its creation time, oldest first, and
  the id of the one that signs;
- ``vendor-keys.pub``: every public key, one hex key per line with its key id as a
  comment: the file License Servers read with ``--vendor-keys``.

Several Activation Server replicas must share these files (e.g. one Kubernetes Secret
mounted in every pod): each replica re-reads ``keyring.json`` when it changes, so a
rotation is done by updating the shared files (publish the new public key to License
Servers first, then make it active). ``RotateSigningKey`` writes them itself, which
suits a single server or a writable shared volume.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from nacl.signing import SigningKey

from services.activation_server.domain.model import Keyring, StoredKey
from tessera.keys import (
    create_private_file,
    load_or_create_signing_key,
    load_signing_key,
    read_vendor_public_keys,
    vendor_key_id,
)

RECORD_VERSION = 1


class KeyDirectory:
    """The vendor key files beside the first key (implements ``domain.ports.KeyFiles``)."""

    def __init__(self, first_key: Path) -> None:
        self.first_key = first_key
        self.directory = first_key.parent / "vendor-keys"
        self.record = self.directory / "keyring.json"
        self.public_file = first_key.parent / "vendor-keys.pub"

    def version(self) -> tuple[int, int, int] | None:
        """Changes whenever the record is rewritten (None before it exists)."""
        try:
            stat = self.record.stat()
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def load(self, now: dt.datetime) -> tuple[Keyring, bool]:
        """The keyring, and whether the first key was just created (at ``now``). On first
        start the first key is made, recorded as the active one and published."""
        first = load_or_create_signing_key(self.first_key)
        first_id = vendor_key_id(first.signing_key.verify_key)
        recorded = self._read_record()
        keys, active = recorded if recorded is not None else ([], first_id)
        if first_id not in {key_id for key_id, _ in keys}:
            # First start, or a deployment from before rotation: the first key is
            # recorded as made when its file was.
            made = now if first.created else _modified(self.first_key)
            keys.insert(0, (first_id, made))
            self._write_record(keys, active)
        stored = []
        for key_id, created_at in keys:
            signing_key = (
                first.signing_key if key_id == first_id else load_signing_key(self._path(key_id))
            )
            if vendor_key_id(signing_key.verify_key) != key_id:
                raise ValueError(f"{self._path(key_id)} does not hold key {key_id}")
            stored.append(StoredKey(key_id, signing_key, created_at))
        if active not in {key.key_id for key in stored}:
            raise ValueError(f"{self.record} names an active key it does not list")
        keyring = Keyring(tuple(stored), active)
        self.publish(keyring)
        return keyring, first.created

    def add_active(self, signing_key: SigningKey, created_at: dt.datetime) -> Keyring:
        """Store a new key, publish its public half, then make it the one that signs."""
        key_id = vendor_key_id(signing_key.verify_key)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._path(key_id)
        if not create_private_file(path, signing_key.encode().hex() + "\n"):
            raise FileExistsError(f"{path} exists already")
        keyring, _ = self.load(created_at)
        widened = Keyring(
            (*keyring.keys, StoredKey(key_id, signing_key, created_at)), keyring.active_key_id
        )
        # Published before it signs anything, so no certificate is ever signed by a key
        # that the published file does not list.
        self.publish(widened)
        self._write_record([(key.key_id, key.created_at) for key in widened.keys], key_id)
        return Keyring(widened.keys, key_id)

    def publish(self, keyring: Keyring) -> None:
        """Make ``vendor-keys.pub`` list every key of the keyring; keys it already lists
        stay (a License Server may still hold certificates they signed)."""
        published = read_vendor_public_keys([self.public_file])
        if all(key.key_id in published for key in keyring.keys):
            return
        lines = ["# Tessera vendor public keys: trust every key listed here."]
        for key in keyring.keys:
            lines.append(f"{bytes(key.signing_key.verify_key).hex()}  # {key.key_id}")
            published.pop(key.key_id, None)
        for key_id, verify_key in published.items():
            lines.append(f"{bytes(verify_key).hex()}  # {key_id}")
        _replace(self.public_file, "\n".join(lines) + "\n", 0o644)

    def _path(self, key_id: str) -> Path:
        return self.directory / f"{key_id}.key"

    def _read_record(self) -> tuple[list[tuple[str, dt.datetime]], str] | None:
        """Every key id with its creation time, oldest first, and the active key id."""
        try:
            record = json.loads(self.record.read_text())
        except FileNotFoundError:
            return None
        keys = [
            (str(key["key_id"]), dt.datetime.fromisoformat(str(key["created_at"])))
            for key in record["keys"]
        ]
        return keys, str(record["active"])

    def _write_record(self, keys: list[tuple[str, dt.datetime]], active: str) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        record = {
            "version": RECORD_VERSION,
            "active": active,
            "keys": [
                {"key_id": key_id, "created_at": created_at.isoformat()}
                for key_id, created_at in keys
            ],
        }
        _replace(self.record, json.dumps(record, indent=2) + "\n", 0o600)


def _modified(path: Path) -> dt.datetime:
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)


def _replace(path: Path, text: str, mode: int) -> None:
    """Write ``path`` atomically: readers see the old file or the new one, never half."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
