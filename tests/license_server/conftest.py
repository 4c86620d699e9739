"""Fixtures of the License Server suites that run License Servers as real processes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.activating_vendor import ActivatingVendor, start_activating_vendor
from tests.support.databases import DatabaseFactory


@pytest.fixture
async def activating_vendor(
    tmp_path: Path, databases: DatabaseFactory
) -> AsyncIterator[ActivatingVendor]:
    """An in-process vendor and Administrator that activate seats on License Servers."""
    vendor = await start_activating_vendor(tmp_path, databases)
    yield vendor
    await vendor.stop()
