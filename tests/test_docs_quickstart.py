"""The README quickstart and the operator guide's main path, run verbatim.

A block of shell in README.md or docs/operator.md that follows the line
``<!-- runs in tests/test_docs_quickstart.py -->`` is run here exactly as written: all
marked blocks of a document, in order, as one bash script (``set -euo pipefail``, so
variables carry from one block to the next as in a terminal and the first failing command
fails the test). The CLI runs as the installed console script, in a subprocess.

The services run as real processes, started the way ``make up`` starts them
(deploy/local/run.py: the same arguments, data under ``./var`` of the working directory,
its own demo order written to ``var/demo-entitlement.txt``) but on free ports, so the
blocks run with TESSERA_ADMINISTRATOR, TESSERA_LICENSE_SERVER and
TESSERA_ACTIVATION_SERVER set: the one difference from a terminal next to ``make up``.
SQLite only (what ``make up`` runs); the CLI's behaviour on PostgreSQL is in test_cli.py.

Every other ``tessera …`` line in the guides' shell blocks is at least parsed, so a
renamed subcommand or flag fails here too.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tessera.server.serving import is_serving
from tessera_cli import parser as cli_parser
from tests.support.processes import ROOT, free_port

pytestmark = pytest.mark.e2e

MARKER = "<!-- runs in tests/test_docs_quickstart.py -->"
DOCUMENTS = ["README.md", "docs/operator.md", "docs/vendor.md"]
TESTED = ["README.md", "docs/operator.md"]
BLOCK_SEPARATOR = "::docs-block::"
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Block:
    document: str
    line: int
    text: str
    tested: bool


def shell_blocks(document: str) -> list[Block]:
    """The ```sh blocks of a document, and whether each is marked to run."""
    lines = (ROOT / document).read_text().splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        if lines[index].strip() in ("```sh", "```bash", "```shell"):
            start = index + 1
            end = lines.index("```", start)
            tested = start >= 2 and lines[start - 2].strip() == MARKER
            blocks.append(Block(document, start + 1, "\n".join(lines[start:end]), tested))
            index = end
        index += 1
    return blocks


def tessera_commands(block: Block) -> Iterator[list[str]]:
    """The argument lists of the ``tessera`` command lines in a block."""
    for line in block.text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] in ("tessera", ".venv/bin/tessera"):
            # Stop at a pipe or redirection: what follows is another program.
            args = []
            for word in words[1:]:
                if word in ("|", ">", ">>", "&&", ";"):
                    break
                args.append(word)
            yield args


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_tessera_command_in_the_guides_parses(document: str) -> None:
    commands = [args for block in shell_blocks(document) for args in tessera_commands(block)]
    assert commands, f"{document} shows no tessera command"
    for args in commands:
        try:
            cli_parser.build().parse_args(args)
        except Exception as error:  # UsageError, or SystemExit for --help
            if not (isinstance(error, SystemExit) and error.code == 0):
                pytest.fail(f"{document}: `tessera {shlex.join(args)}` does not parse: {error}")


@dataclass
class Stack:
    checkout: Path
    env: dict[str, str]


def _load_make_up() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_up", ROOT / "deploy" / "local" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_service(command: list[str], cwd: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m <service> <args>`` in ``cwd``, as `make up` starts it there."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", *command],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


@pytest.fixture
async def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    """The three services as `make up` runs them, in a checkout-like directory."""
    checkout = tmp_path / "checkout"
    (checkout / "var").mkdir(parents=True)
    (checkout / ".venv").symlink_to(ROOT / ".venv")
    make_up = _load_make_up()
    ports = {name: free_port() for name in ("activation", "license", "admin")}
    targets = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    commands = {
        "activation_server": ["services.activation_server", "--listen", targets["activation"]],
        "license_server": [
            "services.license_server",
            "--listen",
            targets["license"],
            "--vendor-keys",
            str(checkout / "var" / "activation_server" / "vendor-keys.pub"),
        ],
        "administrator": [
            "services.administrator",
            "--listen",
            targets["admin"],
            "--activation-server",
            targets["activation"],
            "--license-server-token-file",
            str(checkout / "var" / "license_server" / "administrator-token"),
        ],
    }
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, target in (
            ("activation_server", targets["activation"]),
            ("license_server", targets["license"]),
            ("administrator", targets["admin"]),
        ):
            processes[name] = start_service(commands[name], checkout, tmp_path / f"{name}.log")
            for _ in range(300):
                if processes[name].poll() is not None:
                    pytest.fail(f"{name} exited: {(tmp_path / f'{name}.log').read_text()}")
                if await is_serving(target, deadline=0.5):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail(f"{name} never became healthy")
        # make up's own demo order, written where make up writes it.
        monkeypatch.setattr(make_up, "ACTIVATION_SERVER", targets["activation"])
        monkeypatch.setattr(make_up, "VAR", checkout / "var")
        monkeypatch.setattr(make_up, "DEMO_FILE", checkout / "var" / "demo-entitlement.txt")
        await make_up.demo_entitlement()

        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("TESSERA_") and key != "NO_COLOR"
        }
        env.update(
            {
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
                "XDG_CONFIG_HOME": str(tmp_path / "config"),
                "TESSERA_ADMINISTRATOR": targets["admin"],
                "TESSERA_LICENSE_SERVER": f"{ports['license']}@127.0.0.1",
                "TESSERA_ACTIVATION_SERVER": targets["activation"],
            }
        )
        yield Stack(checkout, env)
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


def run_document(stack: Stack, document: str) -> list[str]:
    """Run the marked blocks of ``document``; the output of each block."""
    blocks = [block for block in shell_blocks(document) if block.tested]
    assert blocks, f"{document} has no block marked {MARKER!r}"
    script = ["set -euo pipefail"]
    for block in blocks:
        script += [f"echo '{BLOCK_SEPARATOR}'", block.text]
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=stack.checkout,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        pytest.fail(
            f"{document}: a marked block failed with exit {done.returncode}\n"
            f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        )
    outputs = done.stdout.split(BLOCK_SEPARATOR + "\n")[1:]
    assert len(outputs) == len(blocks)
    return outputs


def tessera_json(stack: Stack, *args: str) -> Any:
    import json

    done = subprocess.run(
        ["tessera", *args, "--json"],
        cwd=stack.checkout,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done
    return json.loads(done.stdout)


async def test_readme_quickstart_and_the_operator_guide_run_as_written(stack: Stack) -> None:
    demo = (stack.checkout / "var" / "demo-entitlement.txt").read_text().strip()

    readme = "".join(run_document(stack, "README.md"))
    assert readme.count("serving") >= 2
    assert f"Order {demo} for Demo Building Owner" in readme
    assert re.search(r"client\.station\s+network\s+10\s+0\s+10", readme), readme

    guide = run_document(stack, "docs/operator.md")
    whole = "".join(guide)
    assert "Registration details sent with every activation" in whole
    assert "Activated 2 x client.station" in whole
    assert "Activated 40 x server.device.es" in whole
    assert "FEATURE" in whole and "VIOLATION" in whole
    assert "Trusted storage: healthy" in whole
    assert "Returned certificate" in whole
    assert "BEGIN TESSERA REQUEST" not in whole  # written to a file, not the terminal
    assert "Imported the vendor's answer: activate completed" in whole

    features = {
        f["feature"]: (f["activated"], f["used"])
        for f in tessera_json(stack, "licenses")["features"]
    }
    assert features["client.station"] == (1, 0)  # 2 activated, returned, 1 by file
    assert features["server.device.es"] == (40, 0)
    kinds = [op["kind"] for op in tessera_json(stack, "operations")["operations"]]
    assert sorted(kinds) == ["activate", "activate", "activate", "return"]
