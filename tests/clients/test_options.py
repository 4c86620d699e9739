"""ClientOptions: one set of settings (and defaults) for LicenseClient and
SyncLicenseClient, given as one value or as the keyword arguments the guide documents;
and the client's modules import one way (the start-up rule never imports the client)."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest

from clients import Backoff, ClientOptions, ClientTls, LicenseClient, SyncLicenseClient
from clients.settings import ClientKeywords
from tests.support.processes import ROOT


def test_the_keywords_are_the_options_fields() -> None:
    fields = [field.name for field in dataclasses.fields(ClientOptions)]
    assert list(typing.get_type_hints(ClientKeywords)) == fields


def test_the_defaults_are_the_documented_ones() -> None:
    client = LicenseClient("@localhost")
    assert client.options == ClientOptions()
    assert client.settings.connect_timeout == 2.0
    assert client.settings.call_timeout == 10.0
    assert client.settings.release_timeout == 5.0
    assert client.settings.backoff == Backoff(initial=0.5, maximum=10.0, multiplier=2.0)
    assert client.settings.tls is None
    assert client.settings.metadata == ()
    assert client.user == client.display_name == ""
    assert client.client_host
    assert client.local_licenses is None
    assert client.vendor_keys == {}


def test_options_and_keywords_configure_the_same_client() -> None:
    tls = ClientTls()
    backoff = Backoff(initial=1.0, maximum=4.0)
    values = dict(
        client_host="ws-07",
        user="jsmith",
        display_name="WorkStation 6.0",
        connect_timeout=1.5,
        call_timeout=3.0,
        release_timeout=2.5,
        backoff=backoff,
        tls=tls,
        site_token="s3cret",
    )
    by_keywords = LicenseClient("27000@es-host", **values)  # type: ignore[arg-type]
    by_options = LicenseClient("27000@es-host", ClientOptions(**values))  # type: ignore[arg-type]
    assert by_keywords.options == by_options.options
    assert by_keywords.settings == by_options.settings
    assert by_options.client_host == "ws-07"
    assert by_options.settings.metadata == (("authorization", "Bearer s3cret"),)


def test_keywords_beside_options_win() -> None:
    options = ClientOptions(display_name="WorkStation 6.0", call_timeout=3.0)
    client = LicenseClient("@localhost", options, call_timeout=7.0)
    assert client.display_name == "WorkStation 6.0"
    assert client.settings.call_timeout == 7.0
    assert options.call_timeout == 3.0


def test_backoff_none_is_the_default_backoff() -> None:
    client = LicenseClient("@localhost", ClientOptions(backoff=Backoff(initial=2.0)), backoff=None)
    assert client.settings.backoff == Backoff(initial=2.0)
    assert LicenseClient("@localhost", backoff=None).settings.backoff == Backoff()


def test_an_unknown_keyword_is_refused() -> None:
    with pytest.raises(TypeError):
        LicenseClient("@localhost", call_timeut=1.0)  # type: ignore[call-arg]


def test_local_licenses_still_need_vendor_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs vendor_keys"):
        LicenseClient("@localhost", ClientOptions(local_licenses=tmp_path))


def test_the_sync_client_takes_the_same_options() -> None:
    options = ClientOptions(display_name="Graphics Editor", call_timeout=4.0)
    with SyncLicenseClient("@localhost", options, user="jsmith") as client:
        assert client.client.options == dataclasses.replace(options, user="jsmith")
    with SyncLicenseClient("@localhost", display_name="Graphics Editor") as client:
        assert client.client.display_name == "Graphics Editor"


def _imports(module: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_start_up_rule_does_not_import_the_client() -> None:
    imported = _imports(ROOT / "clients" / "startup.py")
    assert "clients.client" not in imported
    assert "clients.sync" not in imported
    assert "clients" not in imported
