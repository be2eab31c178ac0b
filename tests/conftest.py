"""Shared fixtures: Flower task identity for direct ClientApp calls, one simulated run, small configs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from flwr.supercore.task_identity import TaskIdentity
from waits import seconds


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "scenario(case): the simulation a test checks (tests/test_simulation_scenarios.py runs them)"
    )


@pytest.fixture
def flower_task_identity():
    """What Flower's runtime sets in a ClientApp process before it builds Messages."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield TaskIdentity
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(scope="session")
def simulated_run(tmp_path_factory):
    """`fedvault simulate` of digits, 5 clients (Dirichlet), 3 rounds, the defaults' DP-SGD: (run dir, stdout).

    One real simulation for every test that needs a run (Ray starts in 10-40 s); tests that change
    the run work on a copy.
    """
    out = tmp_path_factory.mktemp("sim") / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedvault.cli",
            "simulate",
            "--out",
            str(out),
            "--set",
            "task=digits",
            "--set",
            "batch-size=32",
            "--set",
            "learning-rate=0.05",
            "--set",
            "num-clients=5",
            "--set",
            "num-server-rounds=3",
            "--set",
            "partitioner=dirichlet",
            "--set",
            "dirichlet-alpha=1.0",
        ],
        capture_output=True,
        text=True,
        timeout=seconds(420),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout
