"""Ed25519 key files, vendor key ids and License Server host identity.

Private keys live in files of mode 0600 holding the hex seed. A key file that others can
read is refused: a leaked host key lets anyone return or repair that host's licenses.
The same rule holds for every secret file a service reads (bearer tokens, TLS keys):
``read_private_file``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey, VerifyKey

from tessera.ids import fingerprint


class InsecureKeyFile(Exception):
    """A private key (or token) file is readable by group or others."""


class UnreadableKeyFile(Exception):
    """A private key (or token) file that does not hold one."""


def check_private_file(path: Path, what: str = "private key") -> None:
    """Raise InsecureKeyFile when group or others may read, write or run ``path``."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InsecureKeyFile(
            f"{path} has mode {stat.filemode(mode)}; a {what} file must be 0600 "
            f"(run: chmod 600 {path})"
        )


def read_private_file(path: Path, what: str = "private key") -> bytes:
    """The bytes of a secret file, refusing one that group or others can read."""
    check_private_file(path, what)
    return path.read_bytes()


@dataclass(frozen=True)
class KeyFile:
    """A signing key loaded from (or just created in) a file."""

    signing_key: SigningKey
    path: Path
    created: bool


def create_private_file(path: Path, content: str) -> bool:
    """Write ``content`` to a new file at ``path`` (mode 0600); False, writing nothing,
    when the file exists already.

    The file appears whole or not at all: ``content`` is written and synced to a draft
    beside ``path``, then hard-linked to ``path``, which fails if another process got
    there first. So processes starting together (replicas sharing a data directory)
    agree on one file, and a crash mid-write leaves no half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return False
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        _write_new(draft, content)
        try:
            os.link(draft, path)
        except FileExistsError:  # another process created it meanwhile: theirs stands
            return False
        except OSError as error:
            if error.errno not in _NO_HARD_LINKS:
                raise
            # A filesystem without hard links (SMB, FAT): take the name exclusively and
            # write in place. One creator still wins, but a process that reads the file
            # while it is written finds it short, refuses to start, and reads it next time.
            try:
                _write_new(path, content)
            except FileExistsError:
                return False
    finally:
        draft.unlink(missing_ok=True)
    return True


# What os.link raises where the filesystem has no hard links.
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def _write_new(path: Path, content: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())


def load_or_create_signing_key(path: Path) -> KeyFile:
    """Load the Ed25519 key at ``path``, creating it (mode 0600, ``create_private_file``:
    whole or not at all) when it does not exist."""
    if not path.exists():
        key = SigningKey.generate()
        if create_private_file(path, key.encode().hex() + "\n"):
            return KeyFile(key, path, created=True)
    return KeyFile(load_signing_key(path), path, created=False)


def load_signing_key(path: Path) -> SigningKey:
    """Load an Ed25519 key file, refusing one that group or others can read, and one
    that does not hold a key (UnreadableKeyFile)."""
    text = read_private_file(path).decode(errors="replace").strip()
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise UnreadableKeyFile(
            f"{path} does not hold an Ed25519 key (64 hex digits); restore it from a "
            "backup, or move it away to have a new key made (a new host key changes "
            "this host's identity)"
        )
    return SigningKey(seed)


def vendor_key_id(verify_key: VerifyKey) -> str:
    """The key id that names a vendor public key in envelopes, e.g. ``VK-7K3M-QX2P``."""
    return "VK-" + fingerprint(b"tessera-vendor-key-v1\0" + bytes(verify_key), groups=2)


def read_machine_id() -> str:
    """This machine's stable identity: systemd's machine-id, else the host name."""
    for candidate in (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id")):
        try:
            value = candidate.read_text().strip()
        except OSError:
            continue
        if value:
            return value
    return socket.gethostname()


def machine_binding(machine_id: str) -> bytes:
    """SHA-256 of the machine identity, so the raw machine id never leaves the host."""
    return hashlib.sha256(b"tessera-machine-v1\0" + machine_id.encode()).digest()


def host_id(public_key: bytes, binding: bytes) -> str:
    """A License Server's host id: a fingerprint of its public key bound to its machine."""
    return fingerprint(b"tessera-host-v1\0" + public_key + binding, groups=4)


@dataclass(frozen=True)
class HostIdentity:
    """A License Server's identity: its host key, bound to the machine it runs on."""

    signing_key: SigningKey
    machine_binding: bytes

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def host_id(self) -> str:
        return host_id(self.public_key, self.machine_binding)


def read_vendor_public_keys(paths: list[Path]) -> dict[str, VerifyKey]:
    """Vendor public keys to trust, by key id, from files of hex keys (one per line, ``#``
    starts a comment). Missing files are skipped: a License Server may start before its
    vendor keys are installed, and refuses certificates until they are."""
    trusted: dict[str, VerifyKey] = {}
    for path in paths:
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            value = line.split("#", 1)[0].strip()
            if value:
                key = VerifyKey(bytes.fromhex(value))
                trusted[vendor_key_id(key)] = key
    return trusted
