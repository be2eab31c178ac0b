"""The warm ClientApp process: its shim runs Flower's flwr-clientapp in a forked task with the shim's
arguments, output and exit code, and falls back to the real command when the warm process is gone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
from deploy_helpers import wait_for
from waits import seconds

from fedvault.deploy.processes import child_env
from fedvault.deploy.warm_clientapp import SHIM_NAME, start_warm_clientapp


@pytest.fixture
def warm(tmp_path):
    process = start_warm_clientapp(tmp_path / "warm.log", child_env())
    try:
        assert process.wait_ready(seconds(60)), process.process.log_tail()
        yield process
    finally:
        process.stop()


def shim_run(warm, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(warm.bin_dir / SHIM_NAME), *args], capture_output=True, text=True, timeout=seconds(60), env=child_env()
    )


def test_the_shim_runs_flowers_clientapp_in_a_forked_task_with_its_output_and_exit_code(warm):
    helped = shim_run(warm, "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: flwr-clientapp"), helped
    refused = shim_run(warm, "--runtime-api-address", "127.0.0.1:1")  # no token: Flower's argparse refuses
    assert refused.returncode == 2 and "--token" in refused.stderr, refused
    log = warm.process.log_text()
    assert len(re.findall(r"task pid \d+ started", log)) == 2
    assert re.search(r"task pid \d+ exited 0", log) and re.search(r"task pid \d+ exited 2", log)
    assert oct(os.stat(warm.directory).st_mode & 0o777) == "0o700"


def test_the_shim_starts_the_real_clientapp_when_the_warm_process_is_gone(warm):
    warm.process.popen.send_signal(signal.SIGKILL)
    warm.process.popen.wait(timeout=seconds(10))
    helped = shim_run(warm, "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: flwr-clientapp"), helped
    assert "task pid" not in warm.process.log_text()


def test_the_warm_process_stops_when_the_process_that_started_it_dies(tmp_path):
    """`fedvault client` killed with SIGKILL never stops its warm process: it notices and exits."""
    code = (
        "import sys, time; from pathlib import Path; from fedvault.deploy.processes import child_env; "
        "from fedvault.deploy.warm_clientapp import start_warm_clientapp; "
        f"w = start_warm_clientapp(Path({str(tmp_path / 'warm.log')!r}), child_env()); "
        "print(w.process.pid, flush=True); time.sleep(600)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=child_env())
    warm_pid = int(parent.stdout.readline())
    log = tmp_path / "warm.log"
    wait_for(lambda: "ready" in log.read_text() if log.exists() else False, seconds(60), "the warm process")
    parent.kill()
    parent.wait(timeout=seconds(10))
    wait_for(lambda: not _alive(warm_pid), seconds(20), "the orphaned warm process to exit")
    assert "parent process gone" in log.read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not yet reaped by init) is gone too
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
