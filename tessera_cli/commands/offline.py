"""Air-gapped sites: the request and the answer travel as files.

``export-request`` (at the site) writes the License Server's signed request;
``submit`` (anywhere with Internet access) takes it to the vendor and writes the answer;
``import-response`` (at the site) installs it. The files are written byte for byte as the
Administrator returns them; an existing file is not overwritten unless asked.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tessera.admin.v1 import admin_pb2
from tessera_cli import records, views
from tessera_cli.arguments import (
    Parser,
    Subcommands,
    add_certificate_choice,
    add_command,
    add_line_choice,
    add_operation_id,
    add_repair_force,
    add_return_options,
)
from tessera_cli.commands import lookup
from tessera_cli.commands.online import operation_id
from tessera_cli.failures import UsageError
from tessera_cli.session import Result, Session

# Far larger than any request or response file (about 1 KiB); the Administrator refuses
# such files anyway, this only avoids reading a wrong multi-gigabyte file into memory.
MAX_FILE_BYTES = 1024 * 1024

_KINDS = {
    "activate": admin_pb2.OPERATION_KIND_ACTIVATE,
    "return": admin_pb2.OPERATION_KIND_RETURN,
    "repair": admin_pb2.OPERATION_KIND_REPAIR,
}


def read_file(session: Session, text: str) -> bytes:
    if text == "-":
        raise UsageError("give the file's path; reading it from stdin is not supported")
    path = session.path(text)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise UsageError(f"{path} is {size} bytes: not a Tessera request or response file")
        return path.read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from error


def write_file(
    session: Session, text: str | None, suggested: str, data: bytes, overwrite: bool
) -> str:
    """Write ``data`` to ``text`` (default: the suggested name here); '-' is stdout."""
    if text == "-":
        if session.json:
            raise UsageError("--output - writes the file to stdout; leave out --json")
        session.stdout.write(data.decode("ascii", errors="replace"))
        session.stdout.flush()
        return "-"
    path = session.path(text or suggested)
    if path.is_dir():
        path = path / suggested
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists already", "Pass --overwrite to replace it.")
    temporary = path.with_name(path.name + ".partial")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror}") from error
    return _shown(session, path)


def _shown(session: Session, path: Path) -> str:
    try:
        return str(path.relative_to(session.cwd))
    except ValueError:
        return str(path)


async def export_request(args: argparse.Namespace, session: Session) -> Result:
    address = session.settings.license_server.value
    kind = str(args.kind)
    request = admin_pb2.ExportRequestRequest(kind=_KINDS[kind], license_server=address)
    if kind == "activate":
        line = await lookup.order_line(session, args.id, args.feature)
        request.activation_id = line.activation_id
        request.count = args.count
    elif kind == "return":
        found = await lookup.certificate(session, address, args.certificate, args.feature)
        request.certificate_id = found.certificate.certificate_id if found else args.certificate
        request.count = args.count
        request.force = args.force
    elif kind == "repair":
        request.force = args.force
    request.operation_id = operation_id(args, session)
    admin = session.connections.administrator()
    async with session.progress.show(f"Preparing the {kind} request on {address}"):
        reply = await session.connections.administrator_call(admin.ExportRequest, request)
    path = write_file(session, args.output, reply.file_name, reply.request_file, args.overwrite)
    return Result(
        {
            "operation": records.operation(reply.operation),
            "file": path,
            "bytes": len(reply.request_file),
        },
        "" if path == "-" else views.exported(session.style, reply, path),
    )


async def submit(args: argparse.Namespace, session: Session) -> Result:
    data = read_file(session, args.request_file)
    admin = session.connections.administrator()
    async with session.progress.show("Taking the request to the vendor"):
        reply = await session.connections.administrator_call(
            admin.SubmitRequest, admin_pb2.SubmitRequestRequest(request_file=data)
        )
    path = write_file(session, args.output, reply.file_name, reply.response_file, args.overwrite)
    return Result(
        {"file": path, "bytes": len(reply.response_file)},
        "" if path == "-" else views.submitted(session.style, path, len(reply.response_file)),
    )


async def import_response(args: argparse.Namespace, session: Session) -> Result:
    data = read_file(session, args.response_file)
    address = session.settings.license_server.value
    admin = session.connections.administrator()
    async with session.progress.show(f"Installing the vendor's answer on {address}"):
        reply = await session.connections.administrator_call(
            admin.ImportResponse,
            admin_pb2.ImportResponseRequest(license_server=address, response_file=data),
        )
    return Result(
        {"operation": records.operation(reply.operation)},
        views.imported(session.style, reply.operation),
    )


def register(commands: Subcommands) -> None:
    """The air-gapped path: export-request (activate, return, repair), submit, import-response."""
    p = add_command(
        commands,
        "export-request",
        None,
        "air-gapped site: write a request file for the vendor",
        "Prepare an activation, return or repair on an air-gapped License Server and write "
        "the signed request (about 700 bytes of text) to a file. Carry it to a machine with "
        "Internet access, `tessera submit` it there, carry the answer back and "
        "`tessera import-response` it here.",
        [
            "tessera export-request activate ENT-MSR2-T2S5-0X07 --feature client.station --count 2",
            "tessera export-request return --feature client.station -o /media/usb",
            "tessera export-request repair -o repair-request.txt",
        ],
    )
    kinds = p.add_subparsers(
        title="what to request", metavar="KIND", required=True, parser_class=Parser
    )
    k = add_command(
        kinds,
        "activate",
        export_request,
        "activate seats of an order line",
        "Write an activation request file.",
        ["tessera export-request activate ACT-K8TD-297G-HW0T --count 2"],
    )
    add_line_choice(k)
    _add_file_output(k, "request file")
    add_operation_id(k)
    k.set_defaults(kind="activate")
    k = add_command(
        kinds,
        "return",
        export_request,
        "return a certificate",
        "Write a return request file; the seats stop serving now.",
        ["tessera export-request return --feature client.station"],
    )
    add_certificate_choice(k, "return")
    add_return_options(k)
    _add_file_output(k, "request file")
    add_operation_id(k)
    k.set_defaults(kind="return")
    k = add_command(
        kinds,
        "repair",
        export_request,
        "repair trusted storage",
        "Write a repair request file (refused while trusted storage is healthy, unless --force).",
        ["tessera export-request repair"],
    )
    add_repair_force(k)
    _add_file_output(k, "request file")
    add_operation_id(k)
    k.set_defaults(kind="repair")

    p = add_command(
        commands,
        "submit",
        submit,
        "on a machine with Internet access: take a request file to the vendor",
        "Take a request file written by `tessera export-request` to the vendor (through this "
        "machine's Administrator; no License Server needed) and write the vendor's answer. A "
        "refused return is an answer too: importing it lets the seats serve again.",
        [
            "tessera submit tessera-activate-…-request.txt",
            "tessera submit /media/usb/tessera-return-…-request.txt -o /media/usb",
        ],
    )
    p.add_argument("request_file", metavar="REQUEST_FILE")
    _add_file_output(p, "response file")

    p = add_command(
        commands,
        "import-response",
        import_response,
        "air-gapped site: install the vendor's answer file",
        "Install the answer file `tessera submit` wrote on the License Server that exported "
        "the request (any other refuses it). Importing twice changes nothing.",
        ["tessera import-response tessera-activate-…-response.txt"],
    )
    p.add_argument("response_file", metavar="RESPONSE_FILE")


def _add_file_output(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help=f"where to write the {what} (a file, a directory, or - for stdout; default: "
        "the suggested name in this directory)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
