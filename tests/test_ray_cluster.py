"""`fedvault simulate` attached to a running Ray cluster (`simulation.ray-address`): a real head
started by `ray start --head`, and one clear line when nothing answers at the address."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from waits import seconds

from fedvault.config import RunConfig
from fedvault.deploy.processes import child_env, executable, free_port, start_process, stop, wait_listening
from fedvault.errors import ConfigError
from fedvault.simulations.harness import backend_config, check_ray_address


def test_an_address_is_host_and_port_and_reaches_ray_init():
    cfg = RunConfig.from_flat({"simulation.ray-address": "10.0.0.5:6379"})
    assert backend_config(cfg, verbose=False)["init_args"]["address"] == "10.0.0.5:6379"
    assert "address" not in backend_config(RunConfig(), verbose=False)["init_args"]  # default: Ray starts here
    for bad in ("10.0.0.5", "10.0.0.5:port", ":6379", "host:70000"):
        with pytest.raises(ConfigError, match="simulation.ray-address"):
            RunConfig.from_flat({"simulation.ray-address": bad})


def test_an_address_nothing_answers_at_is_one_clear_line():
    port = free_port()  # free: nothing listens there
    with pytest.raises(ConfigError) as caught:
        check_ray_address(f"127.0.0.1:{port}", timeout=seconds(5))
    message = str(caught.value)
    assert "\n" not in message and f"127.0.0.1:{port}" in message and f"ray start --head --port {port}" in message


@pytest.fixture
def ray_head():
    """A Ray head in its own process group (`ray start --head --block`), with its own short temp dir
    (Ray's Unix sockets live there) and free ports, stopped with its whole group afterwards."""
    temp = Path(tempfile.mkdtemp(prefix="ray-"))
    port = free_port()
    argv = [
        executable("ray"),
        "start",
        "--head",
        "--block",
        "--port",
        str(port),
        "--num-cpus",
        "2",
        "--include-dashboard=false",
        "--disable-usage-stats",
        "--temp-dir",
        str(temp),
        "--ray-client-server-port",
        str(free_port()),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
    ]
    head = start_process(argv, name="Ray head", log_path=temp / "head.log", env=child_env())
    try:
        wait_listening("127.0.0.1", port, seconds(120), head)
        yield f"127.0.0.1:{port}", temp
    finally:
        stop(head, timeout=seconds(20))
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.integration
def test_a_simulation_attached_to_a_running_ray_head_trains_there(ray_head, tmp_path):
    address, temp = ray_head
    out = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedvault.cli",
            "simulate",
            "--out",
            str(out),
            *("--set", "task=digits", "--set", "num-clients=2", "--set", "num-server-rounds=2"),
            *("--set", "batch-size=32", "--set", "learning-rate=0.05", "--set", "privacy.sample-level=false"),
            *("--set", f"simulation.ray-address={address}"),
        ],
        capture_output=True,
        text=True,
        timeout=seconds(600),
        env=child_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "done: 2 rounds" in done.stdout
    drivers = list(temp.glob("session_*/logs/python-core-driver-*"))
    assert drivers, f"no driver connected to the head in {temp}"  # the run's Ray driver attached there
    workers = list(temp.glob("session_*/logs/python-core-worker-*"))
    assert workers, "the head started no workers: the clients did not train on the cluster"
