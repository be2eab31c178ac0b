"""The warm ClientApp process: its shim runs Flower's flwr-clientapp in a forked task with the shim's
arguments, output and exit code, and falls back to the real command when the warm process is gone."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest
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
