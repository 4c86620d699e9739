"""Every install follows the locks, and the versions that must agree do.

uv.lock pins the whole Python environment (exact versions and hashes) for Linux on x86_64
and aarch64; tools/uv-requirements.txt pins uv itself; tools/package-lock.json pins buf.
These checks fail when an install step could resolve afresh from the registry, when the
lock lacks a platform or a hash, or when tools/versions.py stops catching a floor that
disagrees with the stubs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.processes import ROOT

LOCK = tomllib.loads((ROOT / "uv.lock").read_text())
CONTAINERFILES = sorted((ROOT / "deploy" / "containers").glob("*.Containerfile"))
INSTALLERS = [ROOT / "Makefile", ROOT / ".ci" / "run", *CONTAINERFILES]


def load_versions_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("versions", ROOT / "tools" / "versions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


versions = load_versions_tool()


def commands(path: Path) -> list[str]:
    """The file's lines with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if not line.strip().startswith("#")]


@pytest.mark.parametrize("path", INSTALLERS, ids=lambda path: path.name)
def test_no_install_step_resolves_afresh(path: Path) -> None:
    for line in commands(path):
        for step in re.split(r"&&|;|\|\|", line):
            if re.search(r"\bpip(3)? install\b", step):
                assert "--require-hashes" in step, f"{path.name}: {step.strip()}"
            if re.search(r"\buv\)? sync\b|\buv sync\b", step):
                assert "--locked" in step, f"{path.name}: {step.strip()}"
            assert not re.search(r"\bnpm (install|i)\b", step), f"{path.name}: {step.strip()}"
            assert not re.search(r"\buv pip install\b", step), f"{path.name}: {step.strip()}"


@pytest.mark.parametrize("path", CONTAINERFILES, ids=lambda path: path.name)
def test_images_install_the_lock_on_a_pinned_base(path: Path) -> None:
    text = path.read_text()
    [base] = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert re.search(r"@sha256:[0-9a-f]{64}$|:3\.11\.\d+-slim-\w+$", base), base
    copies = [line for line in commands(path) if line.startswith("COPY ")]
    assert any("uv.lock" in line for line in copies)
    assert any("tools/uv-requirements.txt" in line for line in copies)


def runs_on_cpython_311(wheel: str, machine: str) -> bool:
    """Whether a wheel's tags let CPython 3.11 on manylinux ``machine`` install it."""
    match = re.search(r"-(cp3(\d+)-(cp311|abi3)|py3-none)-(.*)\.whl$", wheel)
    if match is None or not re.search(rf"manylinux[\w.]*_{machine}", match.group(4)):
        return False
    if match.group(2) is None:  # py3-none: pure Python in a platform wheel
        return True
    return match.group(3) == "cp311" or int(match.group(2)) <= 11


def test_the_lock_has_a_hash_for_every_file_and_wheels_for_both_linux_machines() -> None:
    required = " ".join(LOCK["required-markers"])
    assert "'x86_64'" in required and "'aarch64'" in required
    compiled = {"grpcio", "grpcio-tools", "protobuf", "asyncpg", "pynacl", "cffi", "sqlalchemy"}
    for package in LOCK["package"]:
        if "registry" not in package.get("source", {}):
            continue  # the project itself
        files = [*package.get("wheels", []), *([package["sdist"]] if "sdist" in package else [])]
        assert files, package["name"]
        assert all(file["hash"].startswith("sha256:") for file in files), package["name"]
        if package["name"] in compiled:
            wheels = [wheel["url"].rsplit("/", 1)[-1] for wheel in package["wheels"]]
            for machine in ("x86_64", "aarch64"):
                assert any(runs_on_cpython_311(wheel, machine) for wheel in wheels), (
                    f"{package['name']}: no wheel for CPython 3.11 on Linux {machine}"
                )


def test_uv_and_buf_are_pinned_with_hashes() -> None:
    requirements = (ROOT / "tools" / "uv-requirements.txt").read_text()
    assert re.search(r"^uv==[\d.]+", requirements, re.MULTILINE)
    assert "--hash=sha256:" in requirements
    lock = json.loads((ROOT / "tools" / "package-lock.json").read_text())
    packages = {name: entry for name, entry in lock["packages"].items() if name}
    assert "node_modules/@bufbuild/buf" in packages
    assert all(entry["integrity"].startswith("sha512-") for entry in packages.values())


def test_the_stubs_the_lock_and_both_distributions_floors_agree() -> None:
    assert versions.disagreements() == []
    assert versions.generated_with()["grpcio"] == versions.locked()["grpcio-tools"]


@pytest.fixture
def copied_tree(tmp_path: Path) -> Path:
    """The files tools/versions.py reads, copied so a test may change them."""
    for relative in ("uv.lock", "pyproject.toml", "clients/pyproject.toml", *stub_files()):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / relative, tmp_path / relative)
    return tmp_path


def stub_files() -> list[str]:
    return [
        f"{versions.STUBS.as_posix()}/{name}" for name in ("license_pb2.py", "license_pb2_grpc.py")
    ]


def test_a_floor_below_the_stubs_is_caught_and_write_derives_it_again(copied_tree: Path) -> None:
    clients = copied_tree / "clients" / "pyproject.toml"
    clients.write_text(re.sub(r'"grpcio>=[\d.]+', '"grpcio>=1.66.0', clients.read_text()))
    [problem] = versions.disagreements(copied_tree)
    assert "clients/pyproject.toml requires grpcio>=1.66.0" in problem
    versions.write(copied_tree)
    assert versions.disagreements(copied_tree) == []
    assert clients.read_text() == (ROOT / "clients" / "pyproject.toml").read_text()


def test_stubs_from_another_grpcio_tools_than_the_locked_one_are_caught(
    copied_tree: Path,
) -> None:
    stub = copied_tree / versions.STUBS / "license_pb2_grpc.py"
    stub.write_text(
        re.sub(
            r"GRPC_GENERATED_VERSION = '[\d.]+'",
            "GRPC_GENERATED_VERSION = '9.0.0'",
            stub.read_text(),
        )
    )
    problems = versions.disagreements(copied_tree)
    assert any("generated by grpcio-tools 9.0.0" in problem for problem in problems)
    assert any("older than the stubs need" in problem for problem in problems)


def test_the_lock_is_in_date_with_pyproject() -> None:
    uv = ROOT / "tools" / ".venv" / "bin" / "uv"
    if not uv.exists():
        pytest.skip("uv is installed by make (tools/.venv)")
    subprocess.run(
        [str(uv), "lock", "--check", "--offline", "--quiet"], cwd=ROOT, check=True, timeout=60
    )
