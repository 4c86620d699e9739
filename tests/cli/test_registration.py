"""The CLI's layout: each area registers its own subcommands, and imports point one way
(parser -> commands -> arguments), so an area's arguments sit next to its handlers."""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

from tessera_cli import parser as cli_parser
from tests.support.processes import ROOT

CLI = ROOT / "tessera_cli"
AREAS = ["online", "offline", "site", "journal", "config", "vendor"]


def _imports(module: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    (subcommands,) = (
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    return list(subcommands.choices)


def test_every_area_registers_its_own_subcommands() -> None:
    registered: list[str] = []
    for area in AREAS:
        module = importlib.import_module(f"tessera_cli.commands.{area}")
        root = argparse.ArgumentParser()
        module.register(root.add_subparsers())
        registered += _commands(root)
    assert registered == _commands(cli_parser.build())


def test_the_areas_never_import_the_parser_and_the_arguments_no_area() -> None:
    for area in AREAS:
        imported = _imports(CLI / "commands" / f"{area}.py")
        assert "tessera_cli.parser" not in imported, area
        assert "tessera_cli.app" not in imported, area
    imported = _imports(CLI / "arguments.py")
    assert not [name for name in imported if name.startswith("tessera_cli.commands")]
    assert "tessera_cli.parser" not in imported
