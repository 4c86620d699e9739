"""The bearer tokens every test site is configured with, one per role.

In-process sites, real processes and single services all use these, so a test that mixes
them (an in-process vendor activating seats on a License Server process) needs no mapping.
"""

from __future__ import annotations

VENDOR_TOKEN = "test-vendor-token"
OPERATOR_TOKEN = "test-operator-token"
# What the Administrator presents to License Servers (their administrator role).
ADMINISTRATOR_TOKEN = "test-administrator-token"
# The Administrator's credential flags: the site's operator token admits the operator,
# and the Administrator presents ADMINISTRATOR_TOKEN to License Servers.
ADMINISTRATOR_FLAGS = (
    "--operator-token", OPERATOR_TOKEN,
    "--license-server-token", ADMINISTRATOR_TOKEN,
)  # fmt: skip
# A License Server's credential flags, matching the Administrator's.
LICENSE_SERVER_FLAGS = (
    "--operator-token", OPERATOR_TOKEN,
    "--administrator-token", ADMINISTRATOR_TOKEN,
)  # fmt: skip
