"""Flower's fixed deployment waits, shortened: the SuperNode's idle poll and reply waits, and the first
retry of an object not yet available; left alone on a Flower release other than the verified one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

from waits import seconds

from fedvault import flower_timing
from fedvault.flower_timing import FLOWER_IDLE_POLL_S, REPLY_WAIT_S, SuperNodeSleep

# Runs in a fresh interpreter: the override is process-wide, and the test process must keep Flower's.
PULL_WITH_RETRIES = textwrap.dedent(
    """
    import json, sys, threading
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError
    from fedvault.flower_timing import shorten_pull_backoff

    waits = []

    class RecordedEvent(threading.Event):
        def wait(self, timeout=None):  # the back-off; the thread pool's own waits have no timeout
            if timeout is None:
                return super().wait()
            waits.append(timeout)
            return False

    def pull_once_missing_twice(object_id, calls=[]):
        calls.append(object_id)
        if len(calls) <= 2:
            raise ObjectUnavailableError(object_id)
        return b"content"

    before = inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"]
    if sys.argv[1] == "shorten":
        shorten_pull_backoff(0.02)
    inflatable_utils.threading.Event = RecordedEvent
    pulled = inflatable_utils.pull_objects(["a"], pull_once_missing_twice)
    print(json.dumps({
        "before": before,
        "pulled": pulled["a"].decode(),
        "waits": waits,
        "tree_default": inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__["initial_backoff"],
    }))
    """
)


def pull_in_fresh_process(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PULL_WITH_RETRIES, mode], capture_output=True, text=True, timeout=seconds(60)
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_missing_object_is_first_retried_after_the_short_back_off_then_doubling():
    flower = pull_in_fresh_process("flower")
    assert flower["before"] == 1.0 and flower["pulled"] == "content"
    assert 0.8 <= flower["waits"][0] <= 1.2  # Flower 1.41: 1 s, +-20% jitter
    shortened = pull_in_fresh_process("shorten")
    assert shortened["pulled"] == "content" and shortened["tree_default"] == 0.02
    first, second = shortened["waits"]
    assert 0.016 <= first <= 0.024 and 0.032 <= second <= 0.048


def test_the_supernode_keeps_its_idle_poll_under_the_cap_and_looks_for_replies_often(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    polls = SuperNodeSleep(idle=1.0)
    polls.sleep(FLOWER_IDLE_POLL_S)  # nothing to do: Flower's idle sleep
    polls.sleep(0.5)  # Flower's wait for the ClientApp's reply
    assert slept == [1.0, REPLY_WAIT_S]
    assert polls.monotonic is time.monotonic  # everything else is the real `time`


def test_another_flower_release_keeps_flowers_waits_and_says_so(monkeypatch, capsys):
    from flwr.supercore.inflatable import inflatable_utils

    monkeypatch.setattr(flower_timing, "version", lambda _package: "1.42.0")
    before = dict(inflatable_utils.pull_objects.__kwdefaults__)
    flower_timing.shorten_pull_backoff()
    flower_timing.shorten_supernode_polls(0.5)
    assert inflatable_utils.pull_objects.__kwdefaults__ == before
    from flwr.supernode import start_client_internal

    assert start_client_internal.time is time
    err = capsys.readouterr().err
    assert "flwr 1.42.0 is not 1.41.x: keeping Flower's object pull back-off" in err
    assert "flwr 1.42.0 is not 1.41.x: keeping Flower's SuperNode polls" in err
