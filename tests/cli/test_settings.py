"""The CLI without services: settings precedence, config file, tokens, help, terminal output."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera_cli import parser as cli_parser
from tessera_cli.app import App
from tessera_cli.failures import HINTS, CliError, ExitCode, Service, Situation, UsageError
from tessera_cli.settings import Flags, resolve
from tessera_cli.terminal import Cell, Column, Progress, Style, table, wants_colour


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def write_config(home: Path, text: str) -> Path:
    path = home / ".config" / "tessera" / "cli.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_flags_beat_environment_beat_config_beat_defaults(tmp_path: Path, home: Path) -> None:
    write_config(home, 'administrator = "config:1"\nlicense_server = "@config"\ntimeout = 7\n')
    env = {"TESSERA_ADMINISTRATOR": "env:2", "TESSERA_ACTIVATION_SERVER": "env:3"}

    settings = resolve(Flags(administrator="flag:1"), env, tmp_path, home)
    assert (settings.administrator.value, settings.administrator.source) == (
        "flag:1",
        "flag --administrator",
    )
    settings = resolve(Flags(), env, tmp_path, home)
    assert (settings.administrator.value, settings.administrator.source) == (
        "env:2",
        "env TESSERA_ADMINISTRATOR",
    )
    assert settings.license_server.value == "@config"
    assert settings.license_server.source.startswith("config ")
    assert settings.activation_server.value == "env:3"
    assert settings.timeout == 7

    bare = resolve(Flags(), {}, tmp_path, tmp_path / "nobody")
    assert (bare.administrator.value, bare.administrator.source) == ("127.0.0.1:27200", "default")
    assert bare.license_server.value == "@localhost"
    assert bare.activation_server.value == "127.0.0.1:27100"
    assert bare.timeout == 60 and bare.config_file is None
    assert bare.operator_token is None and bare.vendor_token is None


def test_config_file_location_and_mistakes(tmp_path: Path, home: Path) -> None:
    xdg = tmp_path / "xdg" / "tessera" / "cli.toml"
    xdg.parent.mkdir(parents=True)
    xdg.write_text('administrator = "xdg:1"\n')
    settings = resolve(Flags(), {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}, tmp_path, home)
    assert settings.administrator.value == "xdg:1" and settings.config_file == xdg

    explicit = tmp_path / "site.toml"
    explicit.write_text('administrator = "explicit:1"\n')
    settings = resolve(Flags(config=str(explicit)), {"TESSERA_CONFIG": str(xdg)}, tmp_path, home)
    assert settings.administrator.value == "explicit:1"

    for text, words in [
        ("administrator = ", "cannot read"),
        ('adminstrator = "typo:1"\n', "unknown keys: adminstrator"),
        ('timeout = "soon"\n', "timeout must be a number"),
        ("administrator = 27200\n", "administrator must be a string"),
    ]:
        explicit.write_text(text)
        with pytest.raises(UsageError, match=words) as refused:
            resolve(Flags(config=str(explicit)), {}, tmp_path, home)
        assert refused.value.failure.exit_code is ExitCode.USAGE
    with pytest.raises(UsageError, match="does not exist"):
        resolve(Flags(config=str(tmp_path / "missing.toml")), {}, tmp_path, home)
    with pytest.raises(UsageError, match="not a number"):
        resolve(Flags(timeout="soon"), {}, tmp_path, home)


def test_tokens_come_from_flag_env_config_or_the_make_up_data_dir(
    tmp_path: Path, home: Path
) -> None:
    var = tmp_path / "var"
    (var / "license_server").mkdir(parents=True)
    (var / "license_server" / "operator-token").write_text("from-make-up\n")
    (var / "activation_server").mkdir()
    (var / "activation_server" / "vendor-token").write_text("vendor-from-make-up\n")
    (tmp_path / "flag-token").write_text("from-flag\n")
    (tmp_path / "env-token").write_text("from-env-file\n")

    def operator(flags: Flags, env: dict[str, str]) -> tuple[str, str]:
        token = resolve(flags, env, tmp_path, home).operator_token
        assert token is not None
        return token.read(), token.source

    assert operator(Flags(), {}) == ("from-make-up", f"file {var}/license_server/operator-token")
    vendor = resolve(Flags(), {}, tmp_path, home).vendor_token
    assert vendor is not None and vendor.read() == "vendor-from-make-up"
    config = write_config(home, 'operator_token_file = "token"\n')
    (config.parent / "token").write_text("from-config-file\n")
    assert operator(Flags(), {}) == ("from-config-file", f"config {config}")
    write_config(home, 'operator_token = "from-config"\n')
    assert operator(Flags(), {})[0] == "from-config"
    env = {"TESSERA_OPERATOR_TOKEN_FILE": "env-token"}
    assert operator(Flags(), env) == ("from-env-file", "env TESSERA_OPERATOR_TOKEN_FILE")
    env["TESSERA_OPERATOR_TOKEN"] = "from-env"
    assert operator(Flags(), env) == ("from-env", "env TESSERA_OPERATOR_TOKEN")
    assert operator(Flags(operator_token_file="flag-token"), env)[0] == "from-flag"

    elsewhere = resolve(Flags(data_dir=str(tmp_path / "nowhere")), {}, tmp_path, tmp_path)
    assert elsewhere.operator_token is None
    missing = resolve(Flags(operator_token_file="gone"), {}, tmp_path, home).operator_token
    assert missing is not None
    with pytest.raises(UsageError, match="cannot read the token file"):
        missing.read()


def test_an_address_given_empty_is_refused_not_taken_for_the_default(
    tmp_path: Path, home: Path
) -> None:
    """--license-server "$UNSET" used to mean @localhost: a command meant for another
    License Server acted on the local one. Given empty or blank anywhere, it is refused,
    naming where it was given; so are the other services' addresses."""
    config = write_config(home, 'license_server = ""\n')
    cases: list[tuple[Flags, dict[str, str], str]] = [
        (Flags(license_server=""), {}, "--license-server is empty"),
        (Flags(license_server="   "), {}, "--license-server is empty"),
        (Flags(), {"TESSERA_LICENSE_SERVER": ""}, "TESSERA_LICENSE_SERVER is empty"),
        (Flags(), {}, f"license_server in {config} is empty"),
    ]
    for flags, env, words in cases:
        with pytest.raises(CliError) as refused:
            resolve(flags, env, tmp_path, home)
        failure = refused.value.failure
        assert failure.message.startswith(words), failure.message
        assert (failure.exit_code, failure.reason) == (
            ExitCode.USAGE,
            "INVALID_LICENSE_SERVER_ADDRESS",
        )
    config.unlink()
    for flags, env, words in [
        (Flags(administrator=""), {}, "--administrator is empty"),
        (Flags(), {"TESSERA_ACTIVATION_SERVER": " "}, "TESSERA_ACTIVATION_SERVER is empty"),
    ]:
        with pytest.raises(UsageError, match=words):
            resolve(flags, env, tmp_path, home)
    # An address that does not parse is refused before any call, naming its source.
    with pytest.raises(CliError, match=r"'localhost' is not of the form .*\(--license-server\)"):
        resolve(Flags(license_server="localhost"), {}, tmp_path, home)
    # Not given at all: the default, as before.
    assert resolve(Flags(), {}, tmp_path, home).license_server.value == "@localhost"


@pytest.mark.parametrize(
    ("argv", "env", "config", "words"),
    [
        (["--license-server", "", "activate", "ACT-K8TD-297G-HW0T"], {}, "", "--license-server"),
        (["activate", "ACT-K8TD-297G-HW0T"], {"TESSERA_LICENSE_SERVER": ""}, "", "TESSERA_"),
        (["activate", "ACT-K8TD-297G-HW0T"], {}, 'license_server = ""\n', "license_server in"),
        (["licenses", "--license-server", "  "], {}, "", "--license-server"),
        (["move", "c-1", "--from", "", "--to", "@es-host"], {}, "", "--from"),
        (["move", "c-1", "--to", ""], {}, "", "--to"),
        (["--administrator", "", "order", "ENT-K8TD-297G-HW0T"], {}, "", "--administrator"),
    ],
    ids=["flag", "env", "config", "blank", "move-from", "move-to", "administrator"],
)
def test_the_cli_refuses_an_empty_address_in_one_line_and_sends_nothing(
    tmp_path: Path, argv: list[str], env: dict[str, str], config: str, words: str
) -> None:
    """The real console script: exit 2, one line on stderr that names where the empty
    address came from, and not a byte sent to the service it would have called."""
    home = tmp_path / "home"
    if config:  # named as given, relative: its refusal names it so (and fits one line)
        (tmp_path / "cli.toml").write_text(config)
        env = {**env, "TESSERA_CONFIG": "cli.toml"}
    with socket.socket() as service:  # stands in for the Administrator: counts who calls
        service.bind(("127.0.0.1", 0))
        service.listen()
        service.setblocking(False)
        target = f"127.0.0.1:{service.getsockname()[1]}"
        environ = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")},
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "TESSERA_ADMINISTRATOR": target,
            "TESSERA_ACTIVATION_SERVER": target,
            "TESSERA_DATA_DIR": str(tmp_path / "var"),
            **env,
        }
        environ.pop("COLUMNS", None)
        done = subprocess.run(
            [sys.executable, "-m", "tessera_cli", "--timeout", "5", *argv],
            env=environ,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        with pytest.raises(BlockingIOError):
            service.accept()
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: {words}") and "is empty; give" in line, line

    as_json = subprocess.run(
        [sys.executable, "-m", "tessera_cli", "--json", *argv],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert as_json.returncode == 2 and as_json.stderr == ""
    expected = "USAGE" if words == "--administrator" else "INVALID_LICENSE_SERVER_ADDRESS"
    assert json.loads(as_json.stdout)["error"]["reason"] == expected


def run(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    app = App(environ=env, cwd=cwd, stdout=stdout, stderr=stderr, home=cwd)
    code = asyncio.run(app.run(argv))
    return code, stdout.getvalue(), stderr.getvalue()


def test_config_command_says_where_each_setting_came_from(tmp_path: Path) -> None:
    env = {"TESSERA_LICENSE_SERVER": "27001@es-host", "TESSERA_OPERATOR_TOKEN": "secret"}
    code, out, _ = run(["config", "--json", "--timeout", "5"], env, tmp_path)
    assert code == 0
    settings = json.loads(out)["settings"]
    assert settings["license_server"] == {
        "value": "27001@es-host",
        "source": "env TESSERA_LICENSE_SERVER",
    }
    assert settings["timeout"] == {"value": 5.0, "source": "flag --timeout"}
    assert settings["operator_token"]["source"] == "env TESSERA_OPERATOR_TOKEN"
    assert "secret" not in out
    code, out, _ = run(["--license-server", "@other", "config"], env, tmp_path)
    assert code == 0 and "@other" in out and "flag --license-server" in out


def test_usage_errors_exit_2_in_words_or_json(tmp_path: Path) -> None:
    code, out, err = run(["activate"], {}, tmp_path)
    assert code == 2 and out == "" and "the following arguments are required: ID" in err
    code, out, err = run(["--json", "return", "--count", "x"], {}, tmp_path)
    assert code == 2 and err == ""
    assert json.loads(out)["error"]["reason"] == "USAGE"
    code, out, _ = run([], {}, tmp_path)
    assert code == 2 and "commands:" in out
    code, out, _ = run(["--version"], {}, tmp_path)
    assert code == 0 and out.startswith("tessera ")


def leaf_parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    def walk(
        name: str, parser: argparse.ArgumentParser
    ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
        children = [
            action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
        ]
        yield name, parser
        for action in children:
            for child_name, child in action.choices.items():
                yield from walk(f"{name} {child_name}", child)

    yield from walk("tessera", cli_parser.build())


def test_every_subcommand_has_help_with_examples_and_json() -> None:
    parsers = list(leaf_parsers())
    assert len(parsers) > 25
    for name, parser in parsers:
        options = {option for action in parser._actions for option in action.option_strings}
        assert "--json" in options, name
        help_text = parser.format_help()
        assert "exit codes:" in help_text, name
        if name != "tessera":
            assert "examples:\n  tessera " in help_text, name


def test_colours_only_on_a_terminal_and_never_with_no_color() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert wants_colour(Terminal(), {}, disabled=False)
    assert not wants_colour(Terminal(), {"NO_COLOR": "1"}, disabled=False)
    assert not wants_colour(Terminal(), {"TERM": "dumb"}, disabled=False)
    assert not wants_colour(Terminal(), {}, disabled=True)
    assert not wants_colour(io.StringIO(), {}, disabled=False)


def test_the_app_colours_a_terminal_only(tmp_path: Path) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    def config_output(env: dict[str, str], *flags: str) -> str:
        stdout = Terminal()
        app = App(environ=env, cwd=tmp_path, stdout=stdout, stderr=Terminal(), home=tmp_path)
        assert asyncio.run(app.run(["config", *flags])) == 0
        return stdout.getvalue()

    assert "\x1b[" in config_output({})
    assert "\x1b[" not in config_output({"NO_COLOR": "1"})
    assert "\x1b[" not in config_output({}, "--no-color")
    assert "\x1b[" not in config_output({}, "--json")


def test_tables_align_whatever_the_colours() -> None:
    columns = [Column("Feature"), Column("Used", right=True), Column("Violation")]
    rows = [
        ["client.station", "1", Cell("no", "ok")],
        ["server.device.es", "40", Cell("VIOLATION", "bad")],
    ]
    plain = table(Style(False), columns, rows)
    assert plain.splitlines() == [
        "FEATURE           USED  VIOLATION",
        "client.station       1  no",
        "server.device.es    40  VIOLATION",
    ]
    coloured = table(Style(True), columns, rows)
    assert "\x1b[31mVIOLATION\x1b[0m" in coloured
    stripped = coloured.replace("\x1b[1m", "").replace("\x1b[32m", "").replace("\x1b[31m", "")
    assert stripped.replace("\x1b[0m", "") == plain


def test_progress_spins_on_a_terminal_and_clears_its_line() -> None:
    async def wait(progress: Progress) -> None:
        async with progress.show("Activating 2 x client.station"):
            await asyncio.sleep(0.25)

    stream = io.StringIO()
    asyncio.run(wait(Progress(stream, enabled=True)))
    assert "Activating 2 x client.station" in stream.getvalue()
    assert stream.getvalue().endswith("\r\x1b[K")
    quiet = io.StringIO()
    asyncio.run(wait(Progress(quiet, enabled=False)))
    assert quiet.getvalue() == ""


def test_a_repair_refusal_says_when_the_next_repair_is_allowed() -> None:
    situation = Situation(
        {"next_allowed_at": "2027-03-02T12:00:00Z"},
        Service.ADMINISTRATOR,
        "127.0.0.1:27200",
        "",
    )
    assert "next repair of this License Server from 2027-03-02" in HINTS["REPAIR_LIMIT_REACHED"](
        situation
    )
    never = Situation(
        {"next_allowed_at": "9999-12-31T23:59:59Z"}, Service.ADMINISTRATOR, "127.0.0.1:27200", ""
    )
    assert "allows no repairs at all" in HINTS["REPAIR_LIMIT_REACHED"](never)
