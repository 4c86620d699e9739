"""Every domain error a service can raise has a status code in that service's table."""

from __future__ import annotations

import inspect
from types import ModuleType

import grpc
import pytest

from services.activation_server import errors as activation_errors
from services.activation_server.domain import errors as activation_domain
from services.administrator import errors as admin_errors
from services.administrator.domain import errors as admin_domain
from services.license_server import errors as license_errors
from services.license_server.domain import errors as license_domain
from tessera import errors as shared
from tessera.errors import DomainError
from tessera.server.error_table import ErrorTable


def domain_errors(module: ModuleType) -> list[type[DomainError]]:
    return [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, DomainError) and cls.__module__ == module.__name__
    ]


SERVICES = [
    (activation_errors.ERRORS, activation_domain),
    (license_errors.ERRORS, license_domain),
    (admin_errors.ERRORS, admin_domain),
]


@pytest.mark.parametrize(("table", "module"), SERVICES, ids=["activation", "license", "admin"])
def test_every_domain_error_maps_to_a_status_code_other_than_internal(
    table: ErrorTable, module: ModuleType
) -> None:
    errors = domain_errors(module) + domain_errors(shared)
    errors = [cls for cls in errors if cls not in (DomainError, shared.PeerRefused)]
    assert errors
    for cls in errors:
        error = cls.__new__(cls)
        assert table.code_for(error) is not grpc.StatusCode.INTERNAL, cls.__name__


def test_a_peer_refusal_keeps_the_peers_status_code() -> None:
    refusal = shared.PeerRefused(
        "Activation Server", "RESOURCE_EXHAUSTED", "NOT_ENOUGH_SEATS_LEFT", "no", {}
    )
    assert admin_errors.ERRORS.code_for(refusal) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refusal.reason == "NOT_ENOUGH_SEATS_LEFT"
