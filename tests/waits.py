"""Time budgets for tests that wait on processes, scaled by one factor from the environment.

    FEDVAULT_TEST_TIME_FACTOR=3 python -m pytest -q    # a slow or busy machine

Every wait on a server, client, simulation or child process goes through :func:`seconds`, so one
setting stretches them all; nothing waits a hard-coded few seconds.
"""

from __future__ import annotations

import os

TIME_FACTOR = float(os.environ.get("FEDVAULT_TEST_TIME_FACTOR", "1"))
if not TIME_FACTOR > 0:
    raise ValueError(f"FEDVAULT_TEST_TIME_FACTOR must be > 0, got {TIME_FACTOR}")


def seconds(base: float) -> float:
    """``base`` seconds on an idle machine, stretched by ``FEDVAULT_TEST_TIME_FACTOR``."""
    return base * TIME_FACTOR
