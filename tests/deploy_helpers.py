"""Helpers shared by the tests that run `fedvault server` / `fedvault client` as real processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from waits import seconds

from fedvault.deploy.processes import ManagedProcess, child_env, executable, start_process, stop

READY = re.compile(r"^ready$", re.MULTILINE)


class Processes:
    """Children a test started; :meth:`stop_all` stops each by PID (process group)."""

    def __init__(self) -> None:
        self.managed: list[ManagedProcess] = []
        self.groups: list[int] = []

    def start(self, args: list[str], log: Path, name: str, env: dict[str, str] | None = None) -> ManagedProcess:
        process = start_process([executable("fedvault"), *args], name=name, log_path=log, env=child_env(env))
        self.managed.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.managed):
            stop(process, timeout=seconds(15))
        for pgid in self.groups:  # SuperLinks of servers that were SIGKILLed (their own sessions)
            killpg(pgid, signal.SIGKILL)


def client_args(port: int, keys: Path, client_id: int, num_partitions: int, state: Path) -> list[str]:
    """``fedvault client`` arguments for client ``client_id`` dialling ``127.0.0.1:port``."""
    return [
        "client",
        "--server",
        f"127.0.0.1:{port}",
        "--keys",
        str(keys),
        "--client-id",
        str(client_id),
        "--num-partitions",
        str(num_partitions),
        "--state",
        str(state),
    ]


def run_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``fedvault ARGS`` to completion, output captured."""
    return subprocess.run(
        [executable("fedvault"), *args], capture_output=True, text=True, env=child_env(), timeout=seconds(120)
    )


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until it is true; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout:g} s")
        time.sleep(0.2)


def killpg(pgid: int, sig: signal.Signals) -> None:
    """Signal a process group, ignoring one that is already gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
