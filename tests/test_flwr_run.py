"""`flwr run .` from the repository uses fedvault's apps through pyproject's [tool.flwr.app]."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from waits import seconds

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def _stop_managed_superlink(flwr_home: Path) -> None:
    """`flwr run` leaves its managed local SuperLink running; stop it by PID."""
    found = subprocess.run(["pgrep", "-f", f"flower-superlink.*{flwr_home}"], capture_output=True, text=True)
    pids = [int(pid) for pid in found.stdout.split()]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + seconds(20)
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
        time.sleep(0.2)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_flwr_run_dot_trains_with_fedvault_apps(tmp_path):
    flwr_home = tmp_path / "flwr-home"
    run_dir = tmp_path / "run"
    # Flower's local simulation passes no node config and has no pinned server identity: each
    # party's own policy file says "unsealed" (the run config cannot: it asks sealing.mode="off" below,
    # which the deployed apps ignore).
    (tmp_path / "client-policy.toml").write_text('sealing = "off"\n')
    (tmp_path / "server-policy.toml").write_text('mode = "off"\n')
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "FEDVAULT_CLIENT_POLICY": str(tmp_path / "client-policy.toml"),
        "FEDVAULT_SERVER_POLICY": str(tmp_path / "server-policy.toml"),
    }
    try:
        proc = subprocess.run(
            [
                "flwr",
                "run",
                ".",
                "--stream",
                "--run-config",
                f'task="digits" num-clients=2 num-server-rounds=2 fraction-evaluate=0.0 batch-size=32 '
                "learning-rate=0.05 "
                f'run-dir="{run_dir}" '
                'sealing.mode="off"',
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=seconds(400),
        )
    finally:
        _stop_managed_superlink(flwr_home)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "uv sync" not in proc.stdout + proc.stderr  # nothing installed at run time
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_accuracy"] > summary["initial_accuracy"]
