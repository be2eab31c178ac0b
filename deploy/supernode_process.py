"""``flower-supernode`` with a shorter idle poll: the process :func:`~fedvault.deploy.supernode.start_supernode` runs.

Flower 1.41's SuperNode asks the SuperLink for a message, and when there is none sleeps a fixed
3 s (``flwr/supernode/start_client_internal.py``), so every round's instruction waits 0-3 s
before a client even sees it. This runs Flower's own ``flower-supernode`` entry point with that
idle sleep capped at ``FEDVAULT_SUPERNODE_POLL_S`` seconds, its reply waits and its first retry of a
missing object shortened (:mod:`fedvault.flower_timing`, on the verified Flower release only).

    python -m fedvault.deploy.supernode_process FLOWER-SUPERNODE-ARGS...
"""

from __future__ import annotations

import os
import sys

from fedvault.flower_timing import FLOWER_IDLE_POLL_S, shorten_pull_backoff, shorten_supernode_polls

POLL_ENV = "FEDVAULT_SUPERNODE_POLL_S"


def main() -> None:
    from flwr.supernode.cli.flower_supernode import flower_supernode

    shorten_supernode_polls(float(os.environ.get(POLL_ENV, FLOWER_IDLE_POLL_S)))
    shorten_pull_backoff()
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
