"""Shorter waits inside Flower's deployment processes, applied only to the Flower release verified.

Two of Flower 1.41's fixed waits dominate a deployment round once ClientApps start warm:

- the idle SuperNode sleeps 3 s between asks for a message, and while its ClientApp works it looks
  for the reply every 0.5 s (``flwr/supernode/start_client_internal.py``);
- an object not yet available is retried after 1 s, then 2 s, 4 s ... (``PULL_INITIAL_BACKOFF`` in
  ``flwr/supercore/constant.py``). A SuperNode stores a message *before* it has pulled the message's
  objects, so a ClientApp that starts at once usually finds them missing and sleeps a whole second.

Both are module-level defaults; this module overrides them in the process that calls it, on the
Flower release they were read from (others run unchanged, with a line on stderr).
"""

from __future__ import annotations

import sys
import time
from importlib.metadata import version
from typing import Any

VERIFIED_FLOWER = "1.41."
FLOWER_IDLE_POLL_S = 3.0
#: How often a SuperNode looks for its ClientApp's reply (a query of its own local state; Flower: 0.5 s).
REPLY_WAIT_S = 0.05
#: First retry of a missing object (doubling from there up to Flower's cap of 10 s).
PULL_INITIAL_BACKOFF_S = 0.02


class SuperNodeSleep:
    """``time`` as the SuperNode loop sees it: its idle sleep at most ``idle`` seconds, its shorter
    waits for a reply at most :data:`REPLY_WAIT_S`."""

    def __init__(self, idle: float) -> None:
        self.idle = idle

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.idle if seconds >= FLOWER_IDLE_POLL_S else REPLY_WAIT_S))


def flower_verified(what: str) -> bool:
    """Whether the installed Flower is the verified release; if not, say that Flower's ``what`` is kept."""
    if version("flwr").startswith(VERIFIED_FLOWER):
        return True
    print(
        f"fedvault: flwr {version('flwr')} is not {VERIFIED_FLOWER}x: keeping Flower's {what}",
        file=sys.stderr,
        flush=True,
    )
    return False


def shorten_supernode_polls(idle: float) -> None:
    """The SuperNode asks for a message every ``idle`` s when it has none (at most Flower's 3 s) and
    looks for its ClientApp's reply every :data:`REPLY_WAIT_S`."""
    if not flower_verified("SuperNode polls"):
        return
    from flwr.supernode import start_client_internal

    start_client_internal.time = SuperNodeSleep(min(idle, FLOWER_IDLE_POLL_S))  # type: ignore[assignment]


def shorten_pull_backoff(initial: float = PULL_INITIAL_BACKOFF_S) -> None:
    """Retry a missing object after ``initial`` s rather than 1 s (every later retry still doubles,
    and Flower's limits on tries and total time still apply)."""
    if not flower_verified("object pull back-off"):
        return
    from flwr.supercore.inflatable import inflatable_utils

    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = function.__kwdefaults__
        if defaults is None or "initial_backoff" not in defaults:
            raise RuntimeError(f"flwr {version('flwr')}: {function.__qualname__} has no initial_backoff default")
        defaults["initial_backoff"] = initial
