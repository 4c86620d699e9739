"""Request and response files for air-gapped sites: small, versioned, ASCII-armoured.

A file is a serialized ``tessera.admin.v1.RequestFile`` (or ``ResponseFile``) in base64
between armour lines, with a few header lines for the person carrying it (they are for
reading; the serialized message is what counts) and a checksum that catches a file cut
short or altered on the way::

    -----BEGIN TESSERA REQUEST-----
    Version: 1
    Kind: activate
    Operation: op-7
    Host: 465R-QBR2-AV5K-9ZV0
    Checksum: sha256:5d41402abc4b2a76

    CAEQARoEb3AtNyKFAgqYAQoEb3AtNxIOQUNULTdLM00tUVgyUC05...
    -----END TESSERA REQUEST-----

The request inside is signed by the License Server's host key and the answer by a vendor
key, so a file needs no protection of its own: whatever is altered fails verification.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from google.protobuf.message import DecodeError

from services.administrator.domain.errors import (
    DamagedFile,
    FileTooLarge,
    NotATesseraFile,
    UnsupportedFileVersion,
    WrongFileType,
)
from services.administrator.domain.model import OperationKind
from tessera.admin.v1.admin_pb2 import RequestFile, ResponseFile

FORMAT_VERSION = 1
REQUEST = "TESSERA REQUEST"
RESPONSE = "TESSERA RESPONSE"
# Real files are a few KB; anything this large is not one of ours.
MAX_FILE_BYTES = 64 * 1024
LINE_LENGTH = 64

_BEGIN = re.compile(r"^-----BEGIN ([A-Z0-9 ]+)-----$")
_HEADER = re.compile(r"^([A-Za-z][A-Za-z-]*): ?(.*)$")
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_NAMES = {REQUEST: "request", RESPONSE: "response"}
_TOOLS = {REQUEST: "SubmitRequest", RESPONSE: "ImportResponse"}


def checksum(payload: bytes) -> str:
    return "sha256:" + hashlib.sha256(payload).hexdigest()[:16]


def armour(label: str, payload: bytes, headers: list[tuple[str, str]]) -> bytes:
    """``payload`` as ASCII armour with ``label``, the headers, and its checksum."""
    body = base64.b64encode(payload).decode("ascii")
    lines = [f"-----BEGIN {label}-----", f"Version: {FORMAT_VERSION}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"Checksum: {checksum(payload)}", ""]
    lines += [body[i : i + LINE_LENGTH] for i in range(0, len(body), LINE_LENGTH)]
    lines.append(f"-----END {label}-----")
    return ("\n".join(lines) + "\n").encode("ascii")


def dearmour(data: bytes, label: str, field: str) -> bytes:
    """The payload of an armoured file with ``label``, or a refusal saying what is wrong."""
    what = _NAMES[label]
    if len(data) > MAX_FILE_BYTES:
        raise FileTooLarge(
            field, f"is {len(data)} bytes; a {what} file is a few KB (at most {MAX_FILE_BYTES})"
        )
    if not data.strip():
        raise NotATesseraFile(field, f"is empty; expected a Tessera {what} file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as error:
        raise NotATesseraFile(
            field, f"is not a text file; expected a Tessera {what} file (ASCII armour)"
        ) from error
    lines = [line.strip() for line in text.splitlines()]
    begin = next((i for i, line in enumerate(lines) if _BEGIN.match(line)), None)
    if begin is None:
        raise NotATesseraFile(
            field, f"has no -----BEGIN {label}----- line; it is not a Tessera {what} file"
        )
    found = _BEGIN.match(lines[begin])
    assert found is not None
    if found.group(1) != label:
        if found.group(1) in _NAMES:
            other = _NAMES[found.group(1)]
            raise WrongFileType(
                field,
                f"is a {other} file, not a {what} file; give it to "
                f"{_TOOLS[found.group(1)]} instead",
            )
        raise NotATesseraFile(field, f"is a {found.group(1)!r} file, not a Tessera {what} file")
    end_line = f"-----END {label}-----"
    try:
        end = lines.index(end_line, begin + 1)
    except ValueError as error:
        raise DamagedFile(field, f"has no {end_line} line: the file was cut short") from error
    headers: dict[str, str] = {}
    body_lines = lines[begin + 1 : end]
    if "" in body_lines:
        blank = body_lines.index("")
        for line in body_lines[:blank]:
            header = _HEADER.match(line)
            if header is None:
                raise DamagedFile(field, f"has a malformed header line {line[:40]!r}")
            headers[header.group(1).lower()] = header.group(2).strip()
        body_lines = body_lines[blank + 1 :]
    version = headers.get("version", str(FORMAT_VERSION))
    if version != str(FORMAT_VERSION):
        raise UnsupportedFileVersion(
            field,
            f"is a version {version} {what} file; this Administrator reads version "
            f"{FORMAT_VERSION}",
        )
    try:
        payload = base64.b64decode("".join(body_lines), validate=True)
    except (binascii.Error, ValueError) as error:
        raise DamagedFile(
            field, f"the content between the armour lines is damaged: {error}"
        ) from error
    if not payload:
        raise DamagedFile(field, "has nothing between the armour lines")
    expected = headers.get("checksum")
    if expected is not None and expected != checksum(payload):
        raise DamagedFile(field, "does not match its checksum: it was altered or damaged")
    return payload


def _parse(message: RequestFile | ResponseFile, payload: bytes, field: str, what: str) -> None:
    try:
        message.ParseFromString(payload)
    except DecodeError as error:
        raise DamagedFile(field, f"does not parse as a {what} file: {error}") from error
    version = message.format_version
    if version != FORMAT_VERSION:
        raise UnsupportedFileVersion(
            field,
            f"has format version {version}; this Administrator reads version {FORMAT_VERSION}",
        )


def write_request_file(file: RequestFile, kind: OperationKind, host_id: str) -> bytes:
    return armour(
        REQUEST,
        file.SerializeToString(deterministic=True),
        [("Kind", kind.value), ("Operation", file.operation_id), ("Host", host_id)],
    )


def read_request_file(data: bytes, field: str = "request_file") -> RequestFile:
    file = RequestFile()
    _parse(file, dearmour(data, REQUEST, field), field, "request")
    return file


def write_response_file(file: ResponseFile, kind: OperationKind, host_id: str) -> bytes:
    return armour(
        RESPONSE,
        file.SerializeToString(deterministic=True),
        [("Kind", kind.value), ("Operation", file.operation_id), ("Host", host_id)],
    )


def read_response_file(data: bytes, field: str = "response_file") -> ResponseFile:
    file = ResponseFile()
    _parse(file, dearmour(data, RESPONSE, field), field, "response")
    return file


def file_name(kind: OperationKind, operation_id: str, label: str) -> str:
    """A suggested name, e.g. ``tessera-activate-op-7-request.txt``."""
    return f"tessera-{kind.value}-{_SAFE.sub('_', operation_id)}-{_NAMES[label]}.txt"
