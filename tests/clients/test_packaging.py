"""The tessera-client distribution (clients/pyproject.toml) ships what the client imports.

The wheel's file list is written out by hand; these checks fail when the client starts
importing a module the list lacks, when a client module is added without it, or when the
generated stubs need newer grpcio/protobuf than the distribution requires.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.support.processes import ROOT

CLIENTS = ROOT / "clients"
PROJECT = tomllib.loads((CLIENTS / "pyproject.toml").read_text())
SHIPPED = {
    (CLIENTS / source).resolve(): target
    for source, target in PROJECT["tool"]["hatch"]["build"]["targets"]["wheel"][
        "force-include"
    ].items()
}

IMPORTED = """
import sys
import clients, clients.sync, clients.shutdown
for name, module in sorted(sys.modules.items()):
    if name.split(".")[0] in ("clients", "tessera", "services", "sqlalchemy"):
        print(name, getattr(module, "__file__", "") or "")
"""


def shipped_as(path: Path) -> str | None:
    """Where ``path`` lands in the wheel, if it is shipped."""
    for source, target in SHIPPED.items():
        if path == source:
            return target
        if path.is_relative_to(source) and source.is_dir():
            return f"{target}/{path.relative_to(source).as_posix()}"
    return None


def test_every_module_the_client_imports_is_shipped_where_it_is_imported_from() -> None:
    listing = subprocess.run(
        [sys.executable, "-c", IMPORTED], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    modules = dict(line.split(" ", 1) for line in listing if line)
    assert not [name for name in modules if name.split(".")[0] in ("services", "sqlalchemy")]
    for name, file in modules.items():
        path = Path(file).resolve()
        expected = path.relative_to(ROOT).as_posix()
        assert shipped_as(path) == expected, f"{name} ({expected}) is not in the wheel"


def test_every_client_module_and_the_typing_markers_are_shipped() -> None:
    for path in [*CLIENTS.glob("*.py"), CLIENTS / "py.typed", ROOT / "tessera" / "py.typed"]:
        assert shipped_as(path.resolve()) is not None, f"{path} is not in the wheel"


def test_the_wheel_ships_the_shared_package_minus_its_server_and_storage_halves() -> None:
    shared = ROOT / "tessera"
    server_side = (shared / "server", shared / "storage")
    for path in shared.rglob("*.py"):
        inside = any(path.is_relative_to(half) for half in server_side)
        shipped = shipped_as(path.resolve()) is not None
        assert shipped != inside, f"{path.relative_to(ROOT)}: shipped={shipped}"


def test_the_generated_stubs_ship_with_their_types() -> None:
    for stub in (ROOT / "tessera").glob("*/v1/*_pb2*.py"):
        assert shipped_as(stub.resolve()) is not None
        assert shipped_as(stub.with_suffix(".pyi").resolve()) is not None


def test_the_required_versions_cover_what_the_stubs_were_generated_with() -> None:
    def version(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in text.split("."))

    required = {
        match.group(1): version(match.group(2))
        for requirement in PROJECT["project"]["dependencies"]
        if (match := re.match(r"([a-z-]+)>=([\d.]+)", requirement))
    }
    stub = (ROOT / "tessera" / "license" / "v1" / "license_pb2.py").read_text()
    protobuf = re.search(r"Protobuf Python Version: ([\d.]+)", stub)
    assert protobuf is not None
    assert required["protobuf"] >= version(protobuf.group(1))
    grpc_stub = (ROOT / "tessera" / "license" / "v1" / "license_pb2_grpc.py").read_text()
    grpc = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_stub)
    assert grpc is not None
    assert required["grpcio"] >= version(grpc.group(1))
