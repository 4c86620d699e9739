"""Crash points for the fault suite.

``TESSERA_FAILPOINTS=name[,name...]`` in a service's environment makes the process kill
itself with SIGKILL the moment it reaches a named step, so a test can stop any of the
three services between any two steps of an operation, exactly as a power cut would.
Unset (always, outside tests), ``reach`` is one set lookup.
"""

from __future__ import annotations

import os
import signal

ENVIRONMENT_VARIABLE = "TESSERA_FAILPOINTS"

_ACTIVE = frozenset(
    name.strip() for name in os.environ.get(ENVIRONMENT_VARIABLE, "").split(",") if name.strip()
)


def reach(name: str) -> None:
    """Die here, without cleanup, when the failpoint ``name`` is armed."""
    if name in _ACTIVE:
        os.kill(os.getpid(), signal.SIGKILL)
