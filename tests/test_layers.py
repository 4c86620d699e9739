"""The layers point one way: servicer -> domain -> ports <- store (STYLE.md).

Every import in the source tree is read with ``ast`` (imports inside functions and under
``TYPE_CHECKING`` count too) and held against the rules below, so a shortcut taken
in a hurry fails here instead of slowly turning the layers into a knot.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("activation_server", "license_server", "administrator")

# What no domain module may import, directly or through a shared module it imports.
WIRE_AND_SQL = (
    "grpc",
    "grpc_status",
    "grpc_health",
    "grpc_reflection",
    "sqlalchemy",
    "asyncpg",
    "aiosqlite",
    "alembic",
)
# The shared package's server and storage halves never reach the client wheel.
SERVER_SIDE = ("tessera.server", "tessera.storage")


def imports_in(source: str, package: str) -> Iterator[str]:
    """The absolute module names ``source`` (a module of ``package``) imports; ``from a
    import b`` yields ``a`` and ``a.b``, since ``b`` may be a module."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def modules_of(path: Path) -> set[str]:
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    return set(imports_in(path.read_text(), package))


def is_under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def module_file(module: str) -> Path | None:
    """The source file of a first-party module, if ``module`` names one."""
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def sources(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "migrations" not in p.parts)


def test_the_checker_finds_lazy_relative_and_from_imports() -> None:
    source = "def f():\n    import grpc\nfrom . import ports\nfrom ..store.leases import x\n"
    found = set(imports_in(source, "services.license_server.domain"))
    assert {"grpc", "services.license_server.domain.ports"} <= found
    assert "services.license_server.store.leases" in found
    assert is_under("sqlalchemy.exc", WIRE_AND_SQL) and not is_under("grpcio_x", ("grpc",))


@pytest.mark.parametrize("service", SERVICES)
def test_no_domain_module_imports_the_wire_sql_or_its_neighbours(service: str) -> None:
    own = f"services.{service}"
    forbidden = (
        f"{own}.store",
        f"{own}.servicer",
        f"{own}.server",
        f"{own}.peers",
        f"{own}.lease_stream",
        *(f"services.{other}" for other in SERVICES if other != service),
        *WIRE_AND_SQL,
        "tessera.storage",
    )
    broken = []
    for path in sources(f"services/{service}/domain"):
        for module in modules_of(path):
            if is_under(module, forbidden) or module.endswith("_pb2_grpc"):
                broken.append(f"{path.relative_to(ROOT)} imports {module}")
                continue
            shared = module_file(module) if module.startswith("tessera.") else None
            if shared is None:
                continue
            for inner in modules_of(shared):
                if is_under(inner, WIRE_AND_SQL):
                    broken.append(
                        f"{path.relative_to(ROOT)} imports {module}, which imports {inner}"
                    )
    assert broken == []


@pytest.mark.parametrize("service", SERVICES)
def test_a_store_imports_only_its_own_store_and_its_domains_model_and_ports(
    service: str,
) -> None:
    own = f"services.{service}"
    allowed = (f"{own}.store", f"{own}.domain.model", f"{own}.domain.ports")
    broken = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in (ROOT / "services" / service / "store").rglob("*.py")
        for module in modules_of(path)
        if is_under(module, ("services",))
        and not is_under(module, allowed)
        # ``from services.x.domain import model`` names the package on its way to the module
        and module not in (f"{own}.domain", "services", f"services.{service}")
    ]
    assert broken == []


@pytest.mark.parametrize("service", SERVICES)
def test_a_servicer_translates_and_never_touches_sql(service: str) -> None:
    own = f"services.{service}"
    broken = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in (ROOT / "services" / service).glob("*.py")
        if path.name not in ("server.py", "__main__.py", "audit.py", "peers.py")
        for module in modules_of(path)
        if is_under(
            module, (f"{own}.store", "sqlalchemy", "asyncpg", "aiosqlite", "tessera.storage")
        )
    ]
    assert broken == []


def test_the_client_safe_shared_package_never_imports_server_or_storage() -> None:
    client_safe = [
        path
        for path in sources("tessera")
        if not is_under(".".join(path.relative_to(ROOT).with_suffix("").parts), SERVER_SIDE)
        and not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    ]
    assert len(client_safe) > 5
    broken = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in client_safe
        for module in modules_of(path)
        if is_under(
            module,
            (
                *SERVER_SIDE,
                "services",
                "sqlalchemy",
                "asyncpg",
                "aiosqlite",
                "alembic",
                "prometheus_client",
            ),
        )
    ]
    assert broken == []


def test_the_client_library_imports_no_server_storage_or_service() -> None:
    broken = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sources("clients")
        for module in modules_of(path)
        if is_under(module, (*SERVER_SIDE, "services", "tessera_cli", "sqlalchemy"))
    ]
    assert broken == []
