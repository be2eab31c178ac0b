"""``flower-supernode`` with a shorter idle poll: the process :func:`~fedvault.deploy.supernode.start_supernode` runs.

Flower 1.41's SuperNode asks the SuperLink for a message, and when there is none sleeps a fixed
3 s (``flwr/supernode/start_client_internal.py``), so every round's instruction waits 0-3 s
before a client even sees it. This runs Flower's own ``flower-supernode`` entry point with that
module's sleeps capped at ``FEDVAULT_SUPERNODE_POLL_S`` seconds (its other sleeps are 0.5 s waits
for a reply, which a cap at or above 0.5 s leaves alone). The cap applies only to the Flower
release it was verified on; with any other the SuperNode runs unchanged and says so.

    python -m fedvault.deploy.supernode_process FLOWER-SUPERNODE-ARGS...
"""

from __future__ import annotations

import os
import sys
import time
from importlib.metadata import version
from typing import Any

POLL_ENV = "FEDVAULT_SUPERNODE_POLL_S"
FLOWER_IDLE_POLL_S = 3.0
VERIFIED_FLOWER = "1.41."


class CappedSleep:
    """``time`` as the SuperNode loop sees it: every ``sleep`` at most ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    cap = float(os.environ.get(POLL_ENV, FLOWER_IDLE_POLL_S))
    if cap < FLOWER_IDLE_POLL_S:
        if version("flwr").startswith(VERIFIED_FLOWER):
            start_client_internal.time = CappedSleep(cap)  # type: ignore[assignment]
        else:
            print(
                f"fedvault: flwr {version('flwr')} is not {VERIFIED_FLOWER}x: the SuperNode keeps Flower's idle poll",
                file=sys.stderr,
                flush=True,
            )
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
